"""Generate docs/benchmarks.md and its plots from the benchmark records.

    python benchmarks/report.py

reads ``docs/benchmarks/records/{quality,speed,speculative,resize,fit}.jsonl`` (whatever
exists) and the rankings files of fits of record in ``docs/benchmarks/rankings/``, and writes
``docs/benchmarks.md`` with the tables, the targets of the issue (met or missed, by how
much), and PNG plots under ``docs/benchmarks/``: perplexity against size per method (log
scale), the units each size keeps per layer, and speed-up against size with the ``0.9 / s``
target. Nothing in the page is typed by hand: a benchmark not yet run shows as "not yet
measured". Each table ends with the machines, dates and commands that produced it.

Where a configuration was measured more than once, the latest record counts, and a table
of the run-to-run spread shows every run of it. Quick
checks (``quick: true``: a subset of the evaluation windows, or a smoke run) never mix
with protocol records: they get their own table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

from ppn_bayes import UntrainedSizeWarning
from ppn_bayes.core.architecture import Architecture
from ppn_bayes.core.config import NOT_IDENTIFYING, FitConfig
from ppn_bayes.core.ranking import Ranking
from ppn_bayes.deploy.finetune import DistillConfig
from ppn_bayes.deploy.subnetwork import selection_from_masks
from ppn_bayes.inspect.trajectory import evaluated_sizes, mask_trajectory, read_validation
from ppn_bayes.io import atomic_file, atomic_write_text
from ppn_bayes.records import BENCHMARKS, RECORDS_DIR, curve_match, read_records

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import (DENSE_MARGIN, DENSE_TARGET_SIZE, METHODS, PROTOCOL_SIZES, RECORD,  # noqa: E402
                      SETTING_ABLATIONS, SHORT_PEERS, SPEED_TARGET, TARGET_RIVALS, TARGET_SIZES, WIDTH_KD_MARGIN,
                      WIDTH_KD_SIZES, fit_changes, label)
from speed import ranking_of, read_rankings  # noqa: E402  (the rankings files of benchmarks/quality.py)

ROOT = Path(__file__).resolve().parents[1]
#: The activation score before issue 15 (input-side weights averaged in: mostly weight magnitude).
OLD_ACTIVATION_SCORE = "mean |W_ij| * rms(X_j) of owned weights"


def superseded(record: dict) -> bool:
    """A record that a fixed bug made obsolete: an activation baseline scored the old way."""
    return (record.get("settings") or {}).get("score") == OLD_ACTIVATION_SCORE


#: Methods in the order of the tables: the registry's (ids it does not hold go last).
ORDER = list(METHODS)
BOOKKEEPING = {"benchmark", "model", "machine", "versions", "command", "date", "settings", "quick"}


def _order(method: str) -> tuple:
    return (ORDER.index(method), "") if method in ORDER else (len(ORDER), method)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits + 1}g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def size_key(record: dict) -> float:
    """The size a record was measured at, rounded to compare (a record without one: the full LM, 1)."""
    return round(float(record.get("size_requested", 1.0)), 4)


def latest(records: list[dict], key) -> dict:
    """The latest record (by date, then file order) of each ``key(record)``."""
    chosen: dict = {}
    for index, record in enumerate(records):
        k = key(record)
        rank = (record.get("date") or "", index)
        if k not in chosen or rank >= chosen[k][0]:
            chosen[k] = (rank, record)
    return {k: v[1] for k, v in chosen.items()}


def provenance(records: list[dict]) -> list[str]:
    """Which machine, when, and which command produced ``records``."""
    groups: dict = defaultdict(list)
    for record in records:
        groups[(record.get("machine", "?"), record.get("command", "?"))].append(record.get("date") or "?")
    lines = ["", "Produced by:", ""]
    for (machine, command), dates in sorted(groups.items(), key=lambda kv: min(kv[1])):
        span = min(dates)[:10] if min(dates)[:10] == max(dates)[:10] else f"{min(dates)[:10]} to {max(dates)[:10]}"
        lines.append(f"- {machine}, {span} ({len(dates)} records): `{command}`")
    versions = {tuple(sorted((r.get("versions") or {}).items())) for r in records}
    if len(versions) == 1 and versions != {()}:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in next(iter(versions)) if v))
    return lines


def _is_quick(record: dict) -> bool:
    return bool(record.get("quick"))


# -- quality ---------------------------------------------------------------------------------------------
def quality_section(records: list[dict], images: Path, image_prefix: str) -> list[str]:
    """Perplexity against size per method, the targets, and the plot."""
    lines = ["## Quality: perplexity against size", ""]
    if not records:
        return lines + ["Not yet measured (`benchmarks/quality.py` writes `quality.jsonl`).", ""]
    lines += ["WikiText-2 raw test, whole file tokenised at once, non-overlapping windows; "
              "perplexity in float32 for every method. Each cell: perplexity (size reached). "
              "Sizes are fractions of decoder parameters.", ""]
    protocol = [r for r in records if not _is_quick(r)]
    quick = [r for r in records if _is_quick(r)]
    for title, group in (("Protocol runs", protocol), ("Quick checks (a subset of the windows: not the protocol)",
                                                        quick)):
        if not group:
            continue
        by_model = defaultdict(list)
        for record in group:
            by_model[(record.get("model"), record.get("seq_len"))].append(record)
        for (model, seq_len), rows in sorted(by_model.items(), key=lambda kv: str(kv[0])):
            lines += [f"### {title}: {model}, {seq_len}-token windows", ""]
            lines += quality_table(rows)
            lines += provenance(rows)
            lines.append("")
            lines += spread_table(rows)
            lines += rate_table(rows)
            lines += ablation_table(rows)
            lines += short_width_kd_table(rows)
            if title == "Protocol runs":
                lines += targets(rows)
                name = f"quality-{_slug(model)}.png"
                if plot_quality(rows, images / name, model):
                    lines += [f"![perplexity against size, {model}]({image_prefix}/{name})", ""]
    return lines


def _slug(text) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))


def fit_settings(record: dict) -> dict:
    """The settings of a record's fit that change what it computes: defaults filled in for
    fields the record predates, without the seed (seeds are repeats)."""
    fit = (record.get("settings") or {}).get("fit") or {}
    try:
        fit = FitConfig.from_dict(fit).to_dict() if fit else {}
    except (TypeError, ValueError):
        pass
    return {k: v for k, v in fit.items() if k not in NOT_IDENTIFYING and k != "seed"}


def distill_settings(record: dict) -> dict:
    """The settings of a record's distillation (width-kd, the +distill fine-tunes) that change
    what it computes: defaults filled in for fields the record predates (``adam_beta2`` was
    PyTorch's 0.999 before it was a setting), without the seed (seeds are repeats)."""
    distill = (record.get("settings") or {}).get("distill") or {}
    if not distill:
        return {}
    full = {f.name: f.default for f in dataclasses.fields(DistillConfig)} | distill
    return {f.name: full[f.name] for f in dataclasses.fields(DistillConfig)
            if f.metadata["identifies"] and f.name != "seed"}


def _rate(record: dict) -> tuple[dict, tuple] | None:
    """(the other settings, (the LM's learning rate, AdamW's beta2)) of a record's training: its
    distillation's, else its fit's; None for a record with neither."""
    distill = distill_settings(record)
    values, names = (distill, ("lr", "adam_beta2")) if distill else (fit_settings(record), ("lr_lm", "adam_beta2"))
    if not values:
        return None
    return {k: v for k, v in values.items() if k not in names}, tuple(values.get(name) for name in names)


def lm_rate(record: dict) -> tuple | None:
    """The LM's learning rate and AdamW's beta2 a record trained with (None: untrained)."""
    rate = _rate(record)
    return rate and rate[1]


def _same_settings(record: dict) -> tuple:
    """What two runs must share to be repeats: the fit's settings and the distillation's
    (:func:`fit_settings`, :func:`distill_settings`), the kind of training text (its name: a
    mixture's stores by name and share, so a store written again by another session is the
    same text), the training tokens and the windows."""
    text = (record.get("settings") or {}).get("train_text") or ""
    return (json.dumps([fit_settings(record), distill_settings(record)], sort_keys=True), record.get("train_tokens"),
            record.get("windows"), text)


def repeats_of(records: list[dict], record: dict) -> list[dict]:
    """The latest run of each seed of ``record``'s method and size with its settings
    (``record`` itself for its seed): what a target must hold for every seed."""
    size = size_key(record)
    same = _same_settings(record)
    runs = [r for r in records if r["method"] == record["method"] and r.get("ppl") is not None
            and size_key(r) == size and _same_settings(r) == same]
    return list(latest(runs, lambda r: ((r.get("settings") or {}).get("fit") or {}).get("seed")).values())


def _every_seed(records: list[dict], record: dict) -> tuple[float, str, str]:
    """What a target judges of ``record``: the worst perplexity of its seeds' runs
    (:func:`repeats_of`: every seed must meet it), the figure shown ("x" for one run, else
    "lowest to highest (n runs)") and the verdict's note (", the worst run" where several)."""
    runs = sorted(r["ppl"] for r in repeats_of(records, record))
    if len(runs) == 1:
        return runs[0], _fmt(runs[0]), ""
    return runs[-1], f"{_fmt(runs[0])} to {_fmt(runs[-1])} ({len(runs)} runs)", ", the worst run"


def spread_table(records: list[dict]) -> list[str]:
    """Every configuration measured more than once with the same settings: the lowest and
    highest perplexity of its runs (the table above shows the latest). A superseded record is
    no run of the configuration that replaced it, so it is left out."""
    groups = defaultdict(list)
    for r in records:
        if r.get("ppl") is not None and not superseded(r):
            groups[(r["method"], _same_settings(r), size_key(r))].append(r["ppl"])
    repeated = {k: v for k, v in groups.items() if len(v) > 1}
    if not repeated:
        return []
    sizes = sorted({k[2] for k in repeated}, reverse=True)
    rows = []
    for method, same in sorted({k[:2] for k in repeated}, key=lambda k: (_order(k[0]), k[1])):
        cells = []
        for size in sizes:
            ppl = groups.get((method, same, size), [])
            cells.append(f"{_fmt(min(ppl))} to {_fmt(max(ppl))} ({len(ppl)})" if len(ppl) > 1 else "–")
        rows.append([label(method), same[3] or "–", _fmt(same[1]), *cells])  # the training text and tokens
    return ["Run-to-run spread: configurations measured more than once with the same settings (the fit's "
            "settings, any seed, training text, training tokens, windows). Each cell: lowest to highest perplexity "
            "(runs). Fits on the GPU are not bit-reproducible (bf16 autocast, atomic adds), and a fit amplifies the "
            "difference.",
            "", *_table(["method", "training text", "training tokens", *(f"{s:g}" for s in sizes)], rows), ""]


def rate_table(records: list[dict]) -> list[str]:
    """The fit of record and width-kd at WIDTH_KD_SIZES by the LM's rate and beta2. A method's
    runs are grouped by their other settings, text, tokens and windows; the table shows the
    group of its latest run and every group measured at more than one rate (a sweep stays in
    sight after a longer run at one rate)."""
    rows = []
    for method in (RECORD, "width-kd"):
        runs = [r for r in records if r["method"] == method and r.get("ppl") is not None and _rate(r)]
        if not runs:
            continue
        newest = max(runs, key=lambda r: r.get("date") or "")

        def context(r):
            same = _same_settings(r)
            return json.dumps(_rate(r)[0], sort_keys=True), same[1], same[2], same[3]

        groups = defaultdict(list)
        for r in runs:
            groups[context(r)].append(r)
        shown = [c for c, kin in groups.items()
                 if c == context(newest) or len({lm_rate(r) for r in kin}) > 1]
        for c in sorted(shown, key=lambda c: (c[1] is None, c[1] or 0, c[0], str(c[2:]))):
            cells = defaultdict(list)
            for r in groups[c]:
                cells[(lm_rate(r), size_key(r))].append(r["ppl"])
            for rate in sorted({k[0] for k in cells}, key=lambda t: tuple(x if x is not None else -1 for x in t)):
                ppl = [cells.get((rate, size), []) for size in WIDTH_KD_SIZES]
                rows.append([label(method), _fmt(c[1]), f"{rate[0]:g}", f"{rate[1]:g}",
                             *(("–" if not p else _fmt(p[0]) if len(p) == 1 else f"{_fmt(min(p))} to {_fmt(max(p))} "
                                f"({len(p)})") for p in ppl)])
    if not any(r[2] != rows[0][2] or r[3] != rows[0][3] for r in rows):
        return []  # one rate only: nothing to compare
    return ["The LM's learning rate and AdamW's beta2: the fit of record and width-kd, in groups of runs that share "
            "their other settings, text, training tokens and windows: the group of each method's latest run, and "
            "every group measured at more than one rate (several runs of one setting: lowest to highest).",
            "", *_table(["method", "training tokens", "rate", "beta2", *(f"{s:g}" for s in WIDTH_KD_SIZES)], rows),
            ""]


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def ablation_table(records: list[dict]) -> list[str]:
    """Each ablation against the fit it ablates: the fit of record (or its shorter variant, the
    ablations' reference at a smaller budget) with the same settings but the ablation's own
    changes, the same seed, text, training tokens and windows. An ablation is a method of its
    own (``protocol.fit_changes``: its latest run) or a run of the reference's method with
    :data:`protocol.SETTING_ABLATIONS` fields set, against the same fit with them at their
    defaults (each setting's latest run). Every run of the reference counts (several: lowest to
    highest), and each ablation's ratio is to their geometric mean at that size, so a rerun of the
    reference shows how far apart two runs of one setting fall. Each reference is followed by the
    ablations it is the reference of."""
    def key(r, changed):
        fit = (r.get("settings") or {}).get("fit") or {}
        kept = {k: v for k, v in fit_settings(r).items() if k not in changed}
        return (json.dumps(kept, sort_keys=True), fit.get("seed"), *_same_settings(r)[1:])

    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig) if f.name in SETTING_ABLATIONS}

    def set_fields(r):  # the SETTING_ABLATIONS fields a run sets away from their defaults
        fit = fit_settings(r)
        return {k: fit[k] for k in defaults if k in fit and fit[k] != defaults[k]}

    usable = [r for r in records if r.get("ppl") is not None and not superseded(r)]
    references = [r for r in usable if r["method"] in (RECORD, "ppn_bayes-short")]
    paired = defaultdict(list)  # the reference's runs (their ids) -> [(row label, its runs by size)]
    kept_refs = {}

    def pair(name, runs, changed, k, method=None):  # method: the reference's (None: either)
        theirs = [r for r in references if method in (None, r["method"]) and key(r, changed) == k
                  and not set_fields(r)]
        if not theirs:
            return
        ids = tuple(sorted(id(r) for r in theirs))
        kept_refs[ids] = theirs
        paired[ids].append((name, latest(runs, size_key)))

    for method in (m for m in METHODS if METHODS[m].family == "ablation"):
        changed = set(fit_changes(method))
        runs = [r for r in usable if r["method"] == method]
        if runs:
            k = key(max(runs, key=lambda r: r.get("date") or ""), changed)
            pair(label(method), [r for r in runs if key(r, changed) == k], changed, k)
    settings_groups = defaultdict(list)  # (method, the fields set, key) -> runs
    for r in references:
        if fields := set_fields(r):
            settings_groups[(r["method"], json.dumps(fields, sort_keys=True), key(r, set(fields)))].append(r)
    for (method, fields, k), runs in settings_groups.items():
        fields = json.loads(fields)
        name = ", ".join([label(method), *(f"{f}={fields[f]}" for f in SETTING_ABLATIONS if f in fields)])
        pair(name, runs, set(fields), k, method)
    rows = []
    for ids in sorted(paired, key=lambda i: max(r.get("date") or "" for r in kept_refs[i]), reverse=True):
        theirs = kept_refs[ids]
        ref = defaultdict(list)
        for r in theirs:
            ref[size_key(r)].append(r["ppl"])
        first = theirs[0]
        when = max(r.get("date") or "" for r in theirs)[:10]
        seed = ((first.get("settings") or {}).get("fit") or {}).get("seed")
        rows.append([label(first["method"]), _fmt(first.get("train_tokens")), str(seed), when,
                     *("–" if s not in ref else _fmt(ref[s][0]) if len(ref[s]) == 1 else
                       f"{_fmt(min(ref[s]))} to {_fmt(max(ref[s]))} ({len(ref[s])})" for s in PROTOCOL_SIZES)])
        for name, mine in sorted(paired[ids], key=lambda entry: entry[0]):
            rows.append([name, "", "", max(r.get("date") or "" for r in mine.values())[:10],
                         *(f"{_fmt(mine[s]['ppl'])} ({mine[s]['ppl'] / _geomean(ref[s]):.2f})" if s in mine and s in ref
                           else "–" for s in PROTOCOL_SIZES)])
    if not rows:
        return []
    return ["Ablations: each one's latest run against the fit it ablates, the row above it (the same settings but "
            "the ablation's, the same seed, text, training tokens and windows; an ablation named by a setting is a "
            "run of the reference's method with that setting). The reference row holds every run of it (several: "
            "lowest to highest, the spread of reruns of one setting). Cells: perplexity (ratio to the geometric mean "
            "of the reference's runs at that size).",
            "", *_table(["method", "training tokens", "seed", "date", *(f"{s:g}" for s in PROTOCOL_SIZES)], rows), ""]


def short_width_kd_table(records: list[dict]) -> list[str]:
    """ppn_bayes-short (every run without a setting ablation) against width-kd-short trained for
    each of WIDTH_KD_SIZES alone on as many tokens: the targets' width-kd comparison at the
    ablations' smaller budget, not the bar (which judges the fit of record)."""
    fit, kd = SHORT_PEERS
    usable = [r for r in records if r.get("ppl") is not None and not superseded(r)]
    ours = [r for r in usable if r["method"] == fit
            and not any(fit_settings(r).get(f) for f in SETTING_ABLATIONS)]
    rows = []
    for tokens in sorted({r.get("train_tokens") for r in ours}, key=lambda t: (t is None, t)):
        for size in WIDTH_KD_SIZES:
            mine = [r for r in ours if r.get("train_tokens") == tokens and size_key(r) == size]
            rivals = [r for r in usable if r["method"] == kd and size_key(r) == size
                      and r.get("train_tokens") == tokens]
            if not mine or not rivals:
                continue
            theirs = max(rivals, key=lambda r: r.get("date") or "")
            ppls = sorted(r["ppl"] for r in mine)
            figure = _fmt(ppls[0]) if len(ppls) == 1 else f"{_fmt(ppls[0])} to {_fmt(ppls[-1])} ({len(ppls)} runs)"
            warmups = sorted({str(fit_settings(r).get("warmup_steps")) for r in mine})
            kd_warmup = ((theirs.get("settings") or {}).get("distill") or {}).get("warmup_steps")
            rows.append([f"{size:g}", _fmt(tokens), figure, _fmt(theirs["ppl"]),
                         f"{_geomean(ppls) / theirs['ppl']:.2f}", f"{', '.join(warmups)} / {kd_warmup}"])
    if not rows:
        return []
    return ["At the ablations' smaller budget: ppn_bayes-short (one fit, every size; its runs without a setting "
            "ablation) against width-kd-short (one run for that size alone) on the same text and as many tokens. "
            "Ratio: the geometric mean of the fits' runs over width-kd's (below 1: ppn_bayes better). Not the "
            "targets, which judge the fit of record.",
            "", *_table(["size", "training tokens", fit, kd, "ratio",
                         "warm-up steps (fit / width-kd)"], rows), ""]


def row_records(records: list[dict]) -> dict:
    """The record of each (method, size) the quality table shows: the latest of the method's
    newest configuration (:func:`_same_settings` of its latest record) at each size that
    configuration was measured at. A row is one configuration: runs that ended together with
    other settings (a setting's ablation beside its reference) never mix in it, and a size only
    earlier settings measured is left out of it (those runs stay in the spread and rate tables),
    so a row's notes (:func:`_fit_notes`) hold for every cell."""
    chosen = {}
    for method, record in latest(records, lambda r: r["method"]).items():
        same = _same_settings(record)
        group = latest([r for r in records if r["method"] == method and _same_settings(r) == same], size_key)
        chosen.update({(method, size): r for size, r in group.items()})
    return chosen


def _fit_notes(picked: list[dict]) -> list[tuple[str, str]]:
    """The marks and notes of a quality row whose fit departs from the plain loop in what its
    steps train: named sizes (``train_sizes``, †), a held start (``hold_steps``, ‡), size
    adapters (``size_rank``, ¶) and settled masks at the end (``settle_steps``, §)."""
    notes, fits = [], [fit_settings(r) for r in picked]
    fit = next((fit for fit in fits if fit.get("train_sizes")), None)
    if fit:
        notes.append(("†", f"every step of the fit trains the sizes {', '.join(f'{x:g}' for x in fit['train_sizes'])} "
                           f"(`train_sizes`) besides `size_min` {fit['size_min']:g}; the other sizes only through its "
                           f"{fit['n_random_sizes']} random sizes a step."))
    fit = next((fit for fit in fits if fit.get("hold_steps")), None)
    if fit:
        notes.append(("‡", f"the first {fit['hold_steps']:,} of the fit's {fit['steps']:,} steps hold the guide at its "
                           "start and train the LM on the start's masks (`hold_steps`); the posterior learns after."))
    fit = next((fit for fit in fits if fit.get("size_rank")), None)
    if fit:
        anchors = ", ".join(f"{a:g}" for a in fit.get("size_anchors") or ())
        notes.append(("¶", f"each size reads its own low-rank correction of the output projections, size adapters "
                           f"of rank {fit['size_rank']} at the sizes {anchors} interpolated between them "
                           "(`size_rank`, `size_anchors`), merged into its weights at export."))
    fit = next((fit for fit in fits if fit.get("settle_steps")), None)
    if fit:
        source = (f"those of the guide averaged over the {fit['average_steps']:,} steps before (`settle_steps`, "
                  "`average_steps`)" if fit.get("average_steps") else "those of the guide then (`settle_steps`)")
        notes.append(("§", f"the last {fit['settle_steps']:,} of the fit's {fit['steps']:,} steps train the LM on the "
                           f"masks that ship, {source}."))
    return notes


def quality_table(records: list[dict]) -> list[str]:
    """Rows: methods; columns: sizes; cells: perplexity (size reached): :func:`row_records`."""
    chosen = row_records(records)
    sizes = sorted({s for _, s in chosen} | set(PROTOCOL_SIZES), reverse=True)
    methods = sorted({m for m, _ in chosen}, key=_order)
    header = ["method", *(f"{s:g}" for s in sizes), "windows", "training tokens"]
    rows, named = [], []
    obsolete = False
    for method in methods:
        picked = [chosen.get((method, s)) for s in sizes]
        cells = [f"{_fmt(r['ppl'])} ({r['size_reached']:.3f})" if r else "–" for r in picked]
        picked = [r for r in picked if r]
        windows = sorted({r.get("windows") for r in picked})
        tokens = sorted({r.get("train_tokens") for r in picked}, key=lambda t: (t is None, t))
        name = label(method)
        if any(superseded(r) for r in picked):
            obsolete = True
            name += " (superseded\\*)"
        for mark, note in _fit_notes(picked):
            name += f" {mark}"
            named.append(f"{mark} {label(method)}: {note}")
        rows.append([name, *cells, ", ".join(_fmt(w) for w in windows), ", ".join(_fmt(t) for t in tokens)])
    lines = _table(header, rows)
    for note in named:
        lines += ["", note]
    if obsolete:
        lines += ["", "\\* Superseded: measured with the activation score of before issue 15, which averaged in the "
                  "weights a unit reads its input with (their Wanda score is their magnitude) and cut MLP units of "
                  "64 consecutive channels in their original order; kept until a rerun replaces them."]
    return lines


def _ratio(ratio: float, limit: float, strict: bool = False) -> str:
    """``ratio`` to two decimals, or to as many more (up to six) as it takes for the printed figure
    to stay on the verdict's side of ``limit`` (``ratio < limit`` met when ``strict``, else
    ``ratio <= limit``): a ratio of 1.1009 against 1.1 reads 1.101, not a missed 1.10."""
    def within(value: float) -> bool:
        return value < limit if strict else value <= limit

    digits = 2
    while digits < 6 and within(float(f"{ratio:.{digits}f}")) != within(ratio):
        digits += 1
    return f"{ratio:.{digits}f}"


def targets(records: list[dict]) -> list[str]:
    """The issue's quality targets (``protocol``): the fit of record below SparseGPT and Wanda at
    0.5/0.4/0.3; within 1.3x dense at 0.5; within 10% of width-kd at 0.5 and 0.3. The records
    judged are the quality table's (:func:`row_records`) with the other seeds' runs of their
    settings, each target judged by the worst (:func:`_every_seed`)."""
    chosen = row_records(records)
    lines = ["Targets (from the issue):", ""]
    rows = []
    for size in TARGET_SIZES:
        ours = chosen.get((RECORD, size))
        for rival in TARGET_RIVALS:
            theirs = chosen.get((rival, size))
            if ours is None or theirs is None:
                rows.append([f"{RECORD} below {label(rival)} at {size:g}", "not yet measured", "–"])
                continue
            worst, figure, note = _every_seed(records, ours)
            rows.append([f"{RECORD} below {label(rival)} at {size:g}",
                         f"{figure}{'' if note else ' (1 run)'} vs {_fmt(theirs['ppl'])}",
                         ("met" if worst < theirs["ppl"] else "missed")
                         + f" (ratio {_ratio(worst / theirs['ppl'], 1.0, strict=True)}{note})"])
    ours, dense = chosen.get((RECORD, DENSE_TARGET_SIZE)), chosen.get(("dense", 1.0))
    target = f"{RECORD} within {DENSE_MARGIN:g} x dense at {DENSE_TARGET_SIZE:g}"
    if ours is None or dense is None:
        rows.append([target, "not yet measured", "–"])
    else:
        worst, figure, note = _every_seed(records, ours)
        ratio = worst / dense["ppl"]
        verdict = "met" if ratio <= DENSE_MARGIN else "missed"
        rows.append([target, f"{figure} vs {_fmt(dense['ppl'])}",
                     verdict + f" ({_ratio(ratio, DENSE_MARGIN)} x dense{note})"])
    rows += width_kd_targets(records, chosen)
    lines += _table(["target", "perplexity", "result"], rows) + [""]
    # not the claim (one fit, no further computation): the optional fine-tunes, beside it
    tuned = [(method, size, chosen[(method, size)]) for method in sorted({m for m, _ in chosen}, key=_order)
             if method in METHODS and METHODS[method].builder == "fit+distill"
             for size in TARGET_SIZES if (method, size) in chosen]
    if tuned:
        rows = []
        for method, size, ours in tuned:
            for rival in TARGET_RIVALS:
                theirs = chosen.get((rival, size))
                if theirs is not None:
                    met = ours["ppl"] < theirs["ppl"]
                    rows.append([f"{label(method)} below {label(rival)} at {size:g}",
                                 f"{_fmt(ours['ppl'])} vs {_fmt(theirs['ppl'])}", _fmt(ours.get("train_tokens")),
                                 ("met" if met else "missed") + f" (ratio {ours['ppl'] / theirs['ppl']:.2f})"])
        lines += ["The same comparison after the optional fine-tune of the chosen size (`ppn-bayes distill`; "
                  "its tokens on top of the fit's, so not the one-fit claim):", ""]
        lines += _table(["comparison", "perplexity", "training tokens", "result"], rows) + [""]
    return lines


def width_kd_targets(records: list[dict], chosen: dict) -> list[list[str]]:
    """ppn_bayes at 0.5 and 0.3 against width-kd trained for that size alone on as many
    tokens, at the best of its measured settings (rate, beta2), judged by ppn_bayes's worst seed:
    within 10% (ratio at most 1.1) is met; below 1 is better."""
    rows = []
    for size in WIDTH_KD_SIZES:
        ours = chosen.get((RECORD, size))
        target = f"{RECORD} within {round((WIDTH_KD_MARGIN - 1) * 100)}% of width-kd at {size:g}, equal training tokens"
        if ours is None:
            rows.append([target, "not yet measured", "–"])
            continue
        rivals = [r for r in records if r["method"] == "width-kd" and r.get("ppl") is not None
                  and size_key(r) == size
                  and r.get("train_tokens") == ours.get("train_tokens")]
        if not rivals:
            rows.append([target, f"no width-kd record of {_fmt(ours.get('train_tokens'))} tokens", "–"])
            continue
        theirs = min(rivals, key=lambda r: r["ppl"])  # the rival at the best of its measured settings
        rate = distill_settings(theirs)
        worst, figure, note = _every_seed(records, ours)
        ratio = worst / theirs["ppl"]
        verdict = ("met" if ratio <= WIDTH_KD_MARGIN else "missed") + f" (ratio {_ratio(ratio, WIDTH_KD_MARGIN)}{note}"
        rows.append([f"{target} ({_fmt(ours.get('train_tokens'))})",
                     f"{figure} vs {_fmt(theirs['ppl'])}"
                     + (f" (lr {rate['lr']:g}, beta2 {rate['adam_beta2']:g})" if rate else ""),
                     verdict + (", better)" if ratio < 1 else ")")])
    return rows


def plot_quality(records: list[dict], path: Path, model) -> bool:
    """Perplexity (log) against size reached, one line per method (the quality table's records,
    :func:`row_records`); False when nothing to plot."""
    chosen = row_records(records)
    series = defaultdict(list)
    for (method, _), record in chosen.items():
        if method != "dense" and record.get("ppl") is not None and math.isfinite(record["ppl"]):
            series[method].append((record["size_reached"], record["ppl"]))
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method in sorted(series, key=_order):
        points = sorted(series[method])
        style = "-o" if method == "ppn_bayes" else ("--." if method.startswith("ppn_bayes-") else "-.s")
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label(method),
                linewidth=2.5 if method == "ppn_bayes" else 1.2, markersize=4)
    dense = chosen.get(("dense", 1.0))
    if dense:
        ax.axhline(dense["ppl"], color="black", linewidth=0.8, label=f"dense ({dense['ppl']:.1f})")
        ax.axhline(1.3 * dense["ppl"], color="grey", linewidth=0.8, linestyle=":", label="1.3 x dense")
    ax.set_yscale("log")
    ax.set_xlabel("size reached (fraction of decoder parameters)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{model}: WikiText-2 perplexity against size")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return True


# -- allocation -------------------------------------------------------------------------------------------------
def units_per_layer(ranking: Ranking, size: float) -> tuple[float, list[int | None], list[int | None]]:
    """The deployed masks of ``size``: the size reached, and each layer's kept attention and MLP
    units (``None`` for a dropped layer). A size outside the sizes the fit trained reads as well,
    without the warning (:meth:`Ranking.untrained` marks it in the tables)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedSizeWarning)
        masks = ranking.masks(size)
    # the masks' widths: a kept layer with no unit reads 0 and 0 (the sub-network leaves it out when it has no
    # output bias, ppn_bayes.deploy.subnetwork.idle_layers)
    widths = selection_from_masks(masks).widths(ranking.arch)
    attention: list[int | None] = [None] * ranking.arch.n_layers
    mlp: list[int | None] = [None] * ranking.arch.n_layers
    for layer, a, m in zip(widths.source_layers, widths.attention_units, widths.mlp_units):
        attention[layer], mlp[layer] = a, m
    return masks.size_reached, attention, mlp


def _layers_kept(attention: list[int | None], mlp: list[int | None], n_layers: int) -> str:
    """The layers a size's masks keep, "K of N", and where some of them keep no unit, how many
    do ("K of N (U with units)"): the sub-network leaves the others out where their output
    projections carry no bias (:func:`ppn_bayes.deploy.subnetwork.idle_layers`)."""
    kept = sum(a is not None for a in attention)
    with_units = sum(a is not None and (a > 0 or m > 0) for a, m in zip(attention, mlp))
    return f"{kept} of {n_layers}" + (f" ({with_units} with units)" if with_units < kept else "")


def _counts(counts: list[int | None], sep: str) -> str:
    return sep.join("-" if n is None else str(n) for n in counts)


def _shown(folder: Path) -> str:
    """A folder as the page names it: relative to the repository where it lies inside it."""
    try:
        return folder.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return folder.as_posix()


def allocation_section(rankings_dir: Path, records: list[dict], images: Path, image_prefix: str) -> list[str]:
    """Where each size keeps its units: per layer, the attention and MLP units that the deployed
    masks of the protocol's sizes keep (one table and one picture per rankings file in
    ``rankings_dir``), beside the uniform cut's widths (the width-kd records)."""
    files = sorted(rankings_dir.glob("*.json")) if rankings_dir.is_dir() else []
    if not files:
        return []
    shown = _shown(rankings_dir)
    lines = ["## Where each size keeps its units", "",
             f"The deployed masks of each protocol size, layer by layer (layers counted from 0), from the rankings "
             f"of fits of record kept in `{shown}/` (the `rankings.json` that `quality.py "
             "--rankings` wrote beside the fit's records). Each cell lists every layer: the units it keeps, `-` for "
             "a dropped layer. A kept layer with no unit (0 and 0) passes its input on unchanged; a sub-network leaves "
             "it out where its output projections carry no bias, as SmolLM2's do not, so that its tokens run through "
             "the layers with units.", ""]
    for path in files:
        for method, entry in read_rankings(path).items():
            ranking = ranking_of(path, method, entry)
            arch = ranking.arch
            fit = entry.get("fit") or {}
            what = ", ".join(x for x in (entry.get("model"), f"seed {fit['seed']}" if "seed" in fit else None,
                                         f"{entry['train_tokens']:,} training tokens" if entry.get("train_tokens")
                                         else None) if x)
            lines += [f"### `{path.name}`: {method}, {what}", ""]
            rows, shares = [], []
            for size in PROTOCOL_SIZES:
                reached, attention, mlp = units_per_layer(ranking, size)
                rows.append([f"{size:g}" + (" (untrained)" if ranking.untrained(size) else ""), f"{reached:.3f}",
                             _layers_kept(attention, mlp, arch.n_layers),
                             _counts(attention, "" if arch.n_attention_units < 10 else " "), _counts(mlp, " ")])
                shares.append((size, attention, mlp))
            lines += _table(["size", "size reached", "layers kept",
                             f"attention units kept (of {arch.n_attention_units}, {arch.heads_per_unit} query heads "
                             "and 1 KV head each)", f"MLP units kept (of {arch.n_mlp_units}, {arch.mlp_group} "
                             "channels each)"], rows)
            name = f"allocation-{_slug(path.stem)}-{_slug(method)}.png"
            plot_allocation(shares, arch, images / name, f"{path.name}: {method}")
            lines += ["", f"![units kept per layer at each size, {path.name}]({image_prefix}/{name})", ""]
    uniform = list(latest([r for r in records if r["method"] == "width-kd" and not _is_quick(r)
                           and r.get("kv_groups") is not None], size_key).values())
    if uniform:
        lines += ["The uniform cut (width-kd's records) keeps every layer, each with the same widths: " + "; ".join(
            f"{size_key(r):g}: {r['kv_groups']} of {r['kv_groups_of']} KV groups and {r['mlp_channels']} of "
            f"{r['mlp_channels_of']} MLP channels in each of its {r['layers_kept']} layers"
            for r in sorted(uniform, key=size_key, reverse=True)) + ".", ""]
    return lines


def plot_allocation(shares: list[tuple[float, list, list]], arch: Architecture, path: Path, title: str) -> None:
    """The share of each layer's attention and MLP units kept at each size: two heatmaps, sizes
    down, layers across; a dropped layer is grey."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(shares) + 1.8), constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    image = None
    for ax, (kind, index, total) in zip(axes, (("attention units", 1, arch.n_attention_units),
                                               ("MLP units", 2, arch.n_mlp_units))):
        grid = np.array([[np.nan if n is None else n / total for n in row[index]] for row in shares])
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_yticks(range(len(shares)), [f"{row[0]:g}" for row in shares])
        ax.set_xticks(range(0, arch.n_layers, max(1, arch.n_layers // 15)))
        ax.set_xlabel("layer")
        ax.set_ylabel("size")
        ax.set_title(f"{kind} kept, of {total} (grey: layer dropped)", fontsize=10)
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="share kept")
    fig.suptitle(title, fontsize=10)
    _savefig(fig, path)
    plt.close(fig)


def layers_with_units(trajectory) -> list[int]:
    """At each evaluation of a :class:`~ppn_bayes.inspect.trajectory.MaskTrajectory`, the layers
    whose deployed masks keep at least one unit (a kept layer with none computes nothing; a
    dropped layer's counts are 0)."""
    return [int(n) for n in ((trajectory.attention + trajectory.mlp) > 0).sum(axis=1)]


def structure_section(validation_dir: Path, rankings_dir: Path, images: Path, image_prefix: str) -> list[str]:
    """How each fit's structure moved: for the evaluations of a fit kept in ``validation_dir``
    (``NAME.jsonl``, the fit's ``validation.jsonl``) beside its rankings file
    (``rankings_dir/NAME.json``, whose architecture reads the masks), the layers in which the
    deployed sub-network of each evaluated size keeps units, and its held-out perplexity, at every
    evaluation; one table per size, and one picture (the layers against the step, a line a fit,
    a panel a size). A file with no rankings file beside it is named as skipped."""
    files = sorted(validation_dir.glob("*.jsonl")) if validation_dir.is_dir() else []
    fits, skipped = [], []
    for path in files:
        rankings = rankings_dir / f"{path.stem}.json"
        if not rankings.is_file():
            skipped.append(path.name)
            continue
        method, entry = next(iter(read_rankings(rankings).items()))
        rows = read_validation(path)
        arch = ranking_of(rankings, method, entry).arch
        fits.append((path.stem, {size: mask_trajectory(rows, arch, size) for size in evaluated_sizes(rows)}, arch))
    if not fits:
        return []
    shown = _shown(validation_dir)
    lines = ["## How each fit's structure moved", "",
             f"From the evaluations of fits kept in `{shown}/` (each the fit's `validation.jsonl`, read with the "
             "architecture of the rankings file of the same name): at each evaluation, the layers in which the "
             "deployed sub-network of a size keeps at least one unit, of the LM's layers, and its held-out "
             "perplexity on the fit's evaluation windows. Cells: layers · perplexity.", ""]
    sizes = sorted({size for _, trajectories, _ in fits for size in trajectories}, reverse=True)
    for size in sizes:
        runs = [(name, trajectories[size], arch) for name, trajectories, arch in fits if size in trajectories]
        steps = sorted({int(step) for _, t, _ in runs for step in t.steps})
        rows = []
        for name, t, arch in runs:
            cells = {int(step): f"{n} · {math.exp(nll):.1f}" for step, n, nll in zip(t.steps, layers_with_units(t), t.nll)}
            rows.append([f"`{name}` ({arch.n_layers} layers)", *(cells.get(step, "–") for step in steps)])
        lines += [f"### Size {size:g}", "", *_table(["fit", *(f"{step:,}" for step in steps)], rows), ""]
    name = "structure-along-the-fits.png"
    plot_structure(fits, sizes, images / name)
    lines += [f"![layers with units against the step, a line a fit, one panel a size]({image_prefix}/{name})", ""]
    if skipped:
        lines += ["Skipped (no rankings file of the same name, so no architecture to read the masks with): "
                  + ", ".join(f"`{n}`" for n in skipped) + ".", ""]
    return lines


def plot_structure(fits: list, sizes: list[float], path: Path) -> None:
    """The layers with units of each evaluated size against the step: one panel a size, a line a fit."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.4), constrained_layout=True, squeeze=False)
    top = max(arch.n_layers for _, _, arch in fits)
    for ax, size in zip(axes[0], sizes):
        ax.set_ylim(0, top + 1)
        for name, trajectories, arch in fits:
            if size in trajectories:
                t = trajectories[size]
                ax.plot(t.steps, layers_with_units(t), marker="o", markersize=3, label=name)
        ax.set_title(f"size {size:g}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("layers with units")
    axes[0][-1].legend(fontsize=7)
    _savefig(fig, path)
    plt.close(fig)


# -- speed -------------------------------------------------------------------------------------------------
def _machine_kind(record: dict) -> str:
    return str(record.get("machine", "?")).split(":")[0]


def speed_section(records: list[dict], images: Path, image_prefix: str) -> list[str]:
    """Tokens/s and speed-ups against the dense model, per machine and phase, with the 0.9/s target
    (``protocol.SPEED_TARGET``)."""
    lines = ["## Speed: sub-networks against the dense model", ""]
    if not records:
        return lines + ["Not yet measured (`benchmarks/speed.py` writes `speed.jsonl`).", ""]
    lines += ["Ratios are measured in one run against the dense model. Target (from the issue): "
              f"speed-up of at least {SPEED_TARGET:g} / s at size s.", ""]
    for title, group in (("Protocol runs", [r for r in records if not _is_quick(r)]),
                         ("Quick checks (smoke runs: not the protocol)", [r for r in records if _is_quick(r)])):
        if not group:
            continue
        # one table per measurement: rows of other shapes or dtypes are not comparable, nor sub-networks
        # cut by another ranking (a later run of one ranking does not leave an older ranking's rows in its table)
        by = defaultdict(list)
        for record in group:
            by[(_machine_kind(record), record.get("phase"), record.get("model"), record.get("dtype"),
                bool(record.get("compiled")), record.get("batch"), record.get("seq_len"),
                record.get("new_tokens"), _rankings_of(record))].append(record)
        # per machine, phase and model, the latest measurement first (only it is plotted)
        newest_first = sorted(by.items(), key=lambda kv: max(r.get("date") or "" for r in kv[1]), reverse=True)
        plotted = set()
        for (machine, phase, model, *_, rankings), rows in sorted(newest_first, key=lambda kv: str(kv[0][:3])):
            first = rows[-1]
            shape = (f"batch {first.get('batch')} x {first.get('seq_len')}" if phase == "prefill" else
                     f"batch {first.get('batch')}, {first.get('seq_len')}-token prompt, "
                     f"{first.get('new_tokens')} new tokens")
            lines += [f"### {title}: {phase} on {machine}, {model} ({first.get('dtype')}, "
                      f"{'compiled' if first.get('compiled') else 'eager'}, {shape}"
                      + (f"; sub-networks of `{rankings}`" if rankings else "") + ")", ""]
            chosen = latest(rows, lambda r: (r["method"], size_key(r)))
            table = []
            for (method, size), r in sorted(chosen.items(), key=lambda kv: (_order(kv[0][0]), -kv[0][1])):
                ratio, reached = r.get("ratio_vs_dense"), r.get("size_reached")
                target = SPEED_TARGET / reached if reached and method != "dense" else None
                verdict = "–" if ratio is None or target is None or method == "dense" else (
                    ("met" if ratio >= target else "missed") + f" ({ratio / target:.2f} of target)")
                table.append([label(method), f"{size:g}", _fmt(reached), _fmt(r.get("tokens_per_s")),
                              _fmt(ratio), _fmt(target), verdict])
            lines += _table(["method", "size", "size reached", "tokens/s", "speed-up", f"target {SPEED_TARGET:g}/s",
                             "result"],
                            table)
            lines += provenance(rows)
            lines.append("")
            if title == "Protocol runs" and (machine, phase, model) not in plotted:
                plotted.add((machine, phase, model))
                name = f"speed-{_slug(machine)}-{phase}.png"
                if plot_speed(list(chosen.values()), images / name, f"{phase} on {machine}"):
                    lines += [f"![speed-up against size, {phase} on {machine}]({image_prefix}/{name})", ""]
    return lines


def _rankings_of(record: dict) -> str:
    """The rankings file a speed record's sub-networks were cut by: ``--rankings`` of its command
    ('' where it names none)."""
    found = re.search(r"--rankings[= ]('[^']*'|\S+)", record.get("command") or "")
    return found.group(1).strip("'") if found else ""


def plot_speed(records: list[dict], path: Path, title: str) -> bool:
    """Speed-up against size reached per method, with the 0.9/s target curve."""
    series = defaultdict(list)
    for r in records:
        if r["method"] != "dense" and r.get("ratio_vs_dense") is not None and r.get("size_reached"):
            series[r["method"]].append((r["size_reached"], r["ratio_vs_dense"]))
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = [0.25 + i * 0.01 for i in range(76)]
    ax.plot(grid, [SPEED_TARGET / s for s in grid], ":", color="grey", label=f"target {SPEED_TARGET:g} / s")
    ax.axhline(1.0, color="black", linewidth=0.8)
    for method in sorted(series, key=_order):
        points = sorted(series[method])
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", label=label(method), markersize=4)
    ax.set_xlabel("size reached (fraction of decoder parameters)")
    ax.set_ylabel("speed-up against dense")
    ax.set_title(title)
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return True


# -- the other benchmarks: generic tables ----------------------------------------------------------------------
TITLES = {
    "speculative": "Speculative decoding: sub-networks as drafts for the dense model",
    "resize": "Resizing from a ranked checkpoint",
    "fit": "Fit cost and scaling",
    "recipes": "Fit recipes: the settings search behind the fit of record",
    "teacher": "Teacher text: sampling speed of ppn-bayes teacher-text",
    "token_nll": "Where the loss goes: excess NLL per token over the dense LM on the evaluation text, by context "
                 "and by kind of token (benchmarks/token_nll.py)",
    "settle": "Settling: the last steps of a fit on the deployed masks (settle_steps), on the demo's tiny LM "
              "(benchmarks/settle.py)",
}
LEADING = ["method", "size_requested", "size_reached"]


def generic_section(benchmark: str, records: list[dict]) -> list[str]:
    """A table of every scalar figure of ``benchmark``'s records (latest per configuration)."""
    lines = [f"## {TITLES.get(benchmark, benchmark)}", ""]
    if not records:
        return lines + [f"Not yet measured (no `{benchmark}.jsonl`).", ""]
    for title, group in (("Protocol runs", [r for r in records if not _is_quick(r)]),
                         ("Quick checks (not the protocol)", [r for r in records if _is_quick(r)])):
        if not group:
            continue
        by_machine = defaultdict(list)
        for record in group:
            by_machine[(_machine_kind(record), record.get("model"))].append(record)
        for (machine, model), rows in sorted(by_machine.items(), key=lambda kv: str(kv[0])):
            columns = [c for c in LEADING if any(c in r for r in rows)]
            for r in rows:
                for key, value in r.items():
                    if key not in BOOKKEEPING and key not in columns and not isinstance(value, (dict, list)):
                        columns.append(key)
            identity = [c for c in columns if c in ("method", "size_requested", "phase", "parallel", "world_size",
                                                    "batch", "seq_len", "draft_length", "k", "processes",
                                                    "global_batch", "scaling", "dtype", "source")]
            chosen = latest(rows, lambda r: tuple(str(r.get(c)) for c in identity))
            ordered = sorted(chosen.values(), key=lambda r: (_order(r.get("method", "")),
                                                            -float(r.get("size_requested") or 0)))
            # columns equal in every row go under the table, once
            common = [c for c in columns if c not in LEADING and len(ordered) > 1
                      and len({_fmt(r.get(c)) for r in ordered}) == 1]
            shown = [c for c in columns if c not in common]
            lines += [f"### {title}: {machine}, {model}", ""]
            lines += _table(shown, [[_fmt(r.get(c)) for c in shown] for r in ordered])
            if common:
                lines += ["", "The same in every row: " + "; ".join(f"{c} {_fmt(ordered[0].get(c))}"
                                                                     for c in common) + "."]
            lines += provenance(rows)
            lines.append("")
    return lines


# -- fit scaling: speed-up and loss curves ------------------------------------------------------------------
def _scaling_pairs(records: list[dict]) -> list[tuple[str, dict, dict, list]]:
    """``(kind, one process, two processes, reference curve)`` of the latest records.

    Strong scaling: one and two processes on the same global batch; the reference curve is
    the one-process curve. Weak scaling with a reference: two processes of ``B`` sequences
    each against one of ``B`` (throughput), and against one process that accumulated two
    micro-batches of ``B`` (the same global batch: the reference curve)."""
    runs = [r for r in records if r.get("scaling") in ("strong", "weak") and not _is_quick(r) and r.get("loss")]
    key = ("scaling", "batch_per_gpu", "seq_len", "dtype", "steps", "device")

    def settings(r):
        return tuple(str(r.get(k) if k != "batch_per_gpu" or r.get("scaling") == "weak" else r.get("global_batch"))
                     for k in key)

    by = latest(runs, lambda r: (r.get("processes"), r.get("parallel"), *settings(r)))
    pairs = []
    for (n, parallel, *same), two in by.items():
        # the one-process run of the same launch: the latest one not after the two-process run
        # (on one process, weak and strong are the same run: fit_scaling.py --reuse shares it)
        ones = [r for r in runs if r.get("processes") == 1 and list(settings(r))[1:] == same[1:]
                and (r.get("date") or "") <= (two.get("date") or "")]
        one = max(ones, key=lambda r: r.get("date") or "", default=None)
        if n != 2 or one is None:
            continue
        if two["scaling"] == "strong":
            pairs.append(("strong", one, two, one["loss"]))
        elif two.get("reference_loss"):
            pairs.append(("weak", one, two, two["reference_loss"]))
    return sorted(pairs, key=lambda p: (p[0], p[2].get("dtype", ""),
                                        p[2].get("global_batch", 0) * p[2].get("seq_len", 0)))


def scaling_section(records: list[dict], images: Path, image_prefix: str) -> list[str]:
    """Two GPUs against one: the speed-up, and the loss curves of the same global batch."""
    pairs = [p for p in _scaling_pairs(records) if _machine_kind(p[2]) != "cpu"]
    if not pairs:
        return []
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, dtype in sorted({(p[0], p[2].get("dtype")) for p in pairs}):
        points = sorted((two["global_batch"] * two["seq_len"], two.get("speedup_vs_1gpu"))
                        for k, one, two, _ in pairs
                        if k == kind and two.get("dtype") == dtype and two.get("speedup_vs_1gpu") is not None)
        left.plot([p[0] for p in points], [p[1] for p in points], "-o", label=f"{kind}, {dtype.split(',')[0]}")
    left.axhline(1.8, color="grey", linestyle=":", label="bar: 1.8")
    left.axhline(2.0, color="black", linewidth=0.8)
    left.set_xscale("log", base=2)
    left.set_xlabel("global batch of the two GPUs (tokens per step)")
    left.set_ylabel("tokens/s, 2 GPUs / 1 GPU")
    left.set_title("scaling on two GPUs")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    for kind, one, two, reference in pairs:
        name = f"{kind} {two['global_batch']} x {two['seq_len']}, {two.get('dtype', '').split(',')[0]}"
        line, = right.plot(reference, "-", linewidth=1, label=f"{name}: 1 GPU")
        right.plot(two["loss"], "--", color=line.get_color(), linewidth=1, label=f"{name}: 2 GPUs")
    right.set_xlabel("step")
    right.set_ylabel("negative ELBO per token (mean over sizes)")
    right.set_title("loss curves of one global batch: 1 GPU (solid), 2 GPUs (dashed)")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _savefig(fig, images / "fit-scaling.png")
    plt.close(fig)
    lines = ["### Two GPUs against one", "", f"![scaling and loss curves]({image_prefix}/fit-scaling.png)", ""]
    rows = []
    for kind, one, two, reference in pairs:  # the curve figures from the curves themselves
        match = curve_match(two["loss"], reference)
        rows.append([kind, f"{two['global_batch']} x {two['seq_len']}", two.get("dtype", ""),
                     _fmt(one["tokens_per_s"]), _fmt(two["tokens_per_s"]), _fmt(two.get("speedup_vs_1gpu")),
                     "one GPU, same batch" if kind == "strong" else "one GPU accumulating 2 micro-batches",
                     _fmt(match["steps_within_1e-3"]), _fmt(match["max_loss_diff_vs_1gpu"]),
                     _fmt(match["mean_loss_diff_last_half"]), _fmt(match["loss_diff_se"]),
                     "yes" if match["curves_agree_in_mean"] else "no"])
    lines += _table(["scaling", "global batch (2 GPUs)", "precision", "1 GPU tokens/s", "2 GPUs tokens/s",
                     "speed-up", "curve compared with", "steps within 1e-3", "max loss diff",
                     "mean diff, 2nd half", "its s.e.", "agree in mean"], rows)
    lines += ["", "Strong scaling splits one global batch over the GPUs; weak scaling gives each GPU the batch "
              "one GPU runs alone (its throughput is the one-GPU figure), and its curve is compared with one GPU "
              "that accumulates the same global batch in micro-batches (`FitConfig.accumulate`). Curves agree "
              "in the mean when the mean difference over the second half of the steps is within two standard "
              "errors; `steps within 1e-3` counts the leading steps that agree to 1e-3, until a straight-through "
              "gate flips under a different summation order.", ""]
    return lines


def _savefig(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, whole or not at all (a temporary file and a rename)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


# -- the page -----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render(records_dir: Path, out: Path, images: Path, rankings_dir: Path | None = None,
           validation_dir: Path | None = None) -> str:
    """The text of docs/benchmarks.md (plots are written on the way); ``rankings_dir``: the
    rankings files of the allocation section (default: ``rankings`` beside ``records_dir``);
    ``validation_dir``: the fits' evaluations of the structure section (default: ``validation``
    beside ``records_dir``)."""
    try:
        prefix = images.resolve().relative_to(out.parent.resolve()).as_posix()
    except ValueError:
        prefix = images.resolve().as_posix()
    records = {b: read_records(b, records_dir) for b in BENCHMARKS}
    lines = [
        "# Benchmarks",
        "",
        "<!-- GENERATED by `python benchmarks/report.py` from docs/benchmarks/records/*.jsonl: do not edit. -->",
        "",
        "Generated by `python benchmarks/report.py` from the JSON records in `docs/benchmarks/records/`; "
        "the protocol is `benchmarks/README.md` (after the project's BENCHMARKS.md). Every figure below "
        "comes from a record that names the machine, the date and the command that produced it.",
        "",
    ]
    lines += quality_section(records["quality"], images, prefix)
    rankings_dir = rankings_dir if rankings_dir is not None else records_dir.parent / "rankings"
    lines += allocation_section(rankings_dir, records["quality"], images, prefix)
    validation_dir = validation_dir if validation_dir is not None else records_dir.parent / "validation"
    lines += structure_section(validation_dir, rankings_dir, images, prefix)
    lines += speed_section(records["speed"], images, prefix)
    for benchmark in ("recipes", "speculative", "resize", "fit", "teacher", "token_nll", "settle"):
        lines += generic_section(benchmark, records[benchmark])
    lines += scaling_section(records["fit"], images, prefix)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: regenerate the page and its plots."""
    p = argparse.ArgumentParser(description="Generate docs/benchmarks.md and its plots from the records.")
    p.add_argument("--records-dir", default=str(ROOT / RECORDS_DIR),
                   help="where the *.jsonl records are (default: docs/benchmarks/records)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="the page to write (default: docs/benchmarks.md)")
    p.add_argument("--images", default=None, help="where the PNG plots go (default: docs/benchmarks/ beside --out)")
    args = p.parse_args(argv)
    out = Path(args.out)
    images = Path(args.images) if args.images else out.parent / "benchmarks"
    text = render(Path(args.records_dir), out, images)
    atomic_write_text(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
