"""Quality benchmark: perplexity against size for every method of BENCHMARKS.md.

The protocol: the LM (SmolLM2-135M-Instruct, dequantised from its GGUF file) is the dense
reference; WikiText-2 raw test is tokenised whole (no special tokens added) and cut into
non-overlapping windows of 2048 tokens; perplexity is evaluated in float32 for every
method; sizes 0.9 0.7 0.5 0.4 0.3 are fractions of decoder parameters. Training,
fine-tuning and calibration read the wiki summaries.

Methods (``--methods``)::

    dense                 the LM itself
    ppn_bayes             one fit (FitConfig below), ranked, sliced at every size
    ppn_bayes-flat        ablation: hierarchy=False (flat units, no layer gates)
    ppn_bayes-point       ablation: posterior='point', prior_weight=0 (no Bayesian prior)
    ppn_bayes-frozen      ablation: train_lm=False (gates only)
    ppn_bayes-nodistill   ablation: distill_weight=0, nll_weight=1 (no self-distillation)
    ppn_bayes-start       ablation: hold_steps = every step, no settling (the LM trained on the
                          start's nested masks, no structure learnt)
    ppn_bayes-alone       ablation: size_min=0.5, no random sizes (every row trains 0.5 alone:
                          width-kd's peer, what sharing the LM with the other sizes costs 0.5)
    ppn_bayes-long        variant: the same settings, recorded apart (give it more --fit-steps)
    ppn_bayes-short       variant: the same, for fewer --fit-steps (the ablations' reference at a
                          smaller budget, kept apart from the fit of record the targets judge)
    ppn_bayes-prefix      variant: gate_coupling='prefix' (every training mask of the size asked)
    ppn_bayes-prefix-frozen, ppn_bayes-prefix-lr
                          variants: prefix gates with a frozen LM; prefix gates with lr_lm=1e-4
    ppn_bayes-teacher     variant: the same settings, fitted on --fit-tokens (text the LM wrote
                          itself from corpus prompts: ppn-bayes teacher-text)
    ppn_bayes-original    variant: teacher='original' (a frozen copy of the LM teaches every
                          size, the full LM included, instead of the full LM as it trains)
    ppn_bayes-original-long  the same, recorded apart (give it more --fit-steps)
    shortgpt              layer removal by block influence, no training
    magnitude             units by weight magnitude, no training
    activation            units by activation-weighted magnitude (Wanda-style), no training
    magnitude-uniform, activation-uniform
                          the same scores, every layer cut by the same fraction (Wanda-sp)
    shortgpt+distill      (also magnitude+distill, activation+distill) the baseline's
                          sub-network fine-tuned by self-distillation with the fit's budget
    ppn_bayes+distill     the fit of record's sub-network fine-tuned the same way (twice the
                          training tokens: the fit's and the fine-tune's); also
                          ppn_bayes-frozen+distill and ppn_bayes-original+distill from those fits;
                          <fit>+distill-long: the fine-tune with 4 x the fit's tokens
    width                 the uniform width cut: every layer kept, the same number of KV groups and
                          of MLP channel groups in each (the best by activation score), the widths
                          whose size is the closest to the size asked without exceeding it; no training
    width-kd              that cut at each --width-kd-sizes, distilled from the dense LM
                          (ppn_bayes.deploy.finetune.distill) on --width-kd-data for --width-kd-tokens
                          tokens with the fit's batch, window and learning rate; one run per size
                          (Minitron-style: the peer a practitioner tries first)
    width-kd-short        the same, for fewer --width-kd-tokens (ppn_bayes-short's peer at equal
                          tokens, kept apart from the width-kd the targets judge)
    sparsegpt, wanda      llm-compressor, unstructured at sparsity 1 - size
    sparsegpt-2:4, wanda-2:4   llm-compressor, 2:4 at size 0.5

Every measurement is appended to ``<records-dir>/quality.jsonl`` as soon as it is made, so
a run cut off by a time limit still leaves its records. Fits checkpoint under
``--work-dir`` and resume there; a finished fit is reused. Rankings (small JSON) go to
``--rankings`` so that ``benchmarks/speed.py`` can rebuild the sub-networks' shapes.

Quick CPU check (say so: the records carry ``quick: true`` and their ``windows``)::

    python benchmarks/quality.py --model "$(../shared/tools/smollm2)" --quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ppn_bayes.core.architecture import describe
from ppn_bayes.core.config import FitConfig
from ppn_bayes.data import TokenBlocks, check_token_ids, load_tokens, save_tokens
from ppn_bayes.lm import vocab_rows
from ppn_bayes.inspect.evaluate import perplexity
from ppn_bayes.io import atomic_file, atomic_write_text
from ppn_bayes.records import RECORDS_DIR, append_record

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import (FINETUNE_SIZES, N_M_SIZE, PROTOCOL_SIZES, RECORD, WIDTH_KD_SIZES, fit_changes,  # noqa: E402
                      ids, listed)
from protocol import method as method_of  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
#: The methods' FitConfig changes from the fit of record, by family (the records name them).
ABLATIONS = {m: fit_changes(m) for m in ids(family="ablation")}
VARIANTS = {m: fit_changes(m) for m in ids(family="variant")}
#: Methods that need --fit-tokens: the teacher text alone, or mixed half and half with the training text.
FIT_TOKENS_METHODS = tuple(m for m in ids(quality=True) if method_of(m).needs_fit_tokens)
#: Methods that mix --fit-tokens half and half with the training text when it is given: the
#: fit of record and its ablations, so that they train on the same text.
MIXING_METHODS = tuple(m for m in ids(quality=True) if method_of(m).mixes_fit_tokens)
METHODS = ids(quality=True)
DEFAULT_METHODS = ids(default=True)
#: The fit of record: 2048-token windows, every row a gated size (the smallest, and three
#: drawn uniformly; no row for the full LM; u^2, more often small, until 5 December 2026),
#: every size taught by the frozen original LM with no next-token loss, deployed-style
#: (prefix) training masks, units started from their activation ranks, a warm-up and a cosine
#: schedule (issue 15); the LM's weights at rate 1e-3 with AdamW's beta2 0.95 (the 12M-token
#: width-kd sweep of 2 December 2026: 64.3 at 1e-4, 54.0 at 3e-4, 49.3 at 1e-3, 53.2 at 3e-3,
#: 47.4 at 1e-3 with beta2 0.95). No settling here, so that a run means what it meant before
#: the recipe scaled its spans (5 December 2026): the GPU runs set ``settle_steps`` and
#: ``average_steps`` with ``--fit-set``. With --fit-tokens it reads the training text and each
#: teacher text in equal shares.
DEFAULT_FIT = FitConfig.recipe("record", steps=300, batch_size=8, seq_len=2048, checkpoint_every=100, log_every=10,
                               warmup_steps=30, settle_steps=0, average_steps=0)
#: The fit of record before issue 15 (self-distillation plus next-token loss, independent
#: gates, neutral start, constant rates): what the records before 2026-12-01 evening ran.
PREVIOUS_FIT = FitConfig(steps=300, batch_size=8, seq_len=2048, size_min=0.3, checkpoint_every=100,
                         log_every=10)
PROBE_STEPS = 10
QUICK_FIT = DEFAULT_FIT.replace(steps=2, batch_size=1, seq_len=128, checkpoint_every=0, log_every=1, warmup_steps=0)


@dataclass(frozen=True)
class QualityConfig:
    """What one run of the quality benchmark measures, and where it writes."""

    model: str
    eval_text: str
    train_text: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    sizes: tuple[float, ...] = PROTOCOL_SIZES
    ablation_sizes: tuple[float, ...] = PROTOCOL_SIZES
    finetune_sizes: tuple[float, ...] = FINETUNE_SIZES
    seq_len: int = 2048
    limit_windows: int | None = None
    eval_batch: int = 8
    calib_windows: int = 128
    calib_seq_len: int = 2048
    calib_seed: int = 0
    fit: FitConfig = DEFAULT_FIT
    autocast: str = "bf16"  # of the fits and fine-tunes on CUDA; evaluation is always float32
    device: str = "cpu"
    work_dir: str = "runs/quality"
    rankings: str | None = None
    records_dir: str = str(RECORDS_DIR)
    model_name: str | None = None
    time_budget: float | None = None
    fit_time_budget: float | None = None  # seconds: fewer fit steps than asked if they would not fit
    quick: bool = False
    save_sparse: str | None = None  # method@size whose pruned weights are kept for speed.py
    fit_tokens: str | None = None  # the token file ppn_bayes-teacher fits on
    width_kd_sizes: tuple[float, ...] = WIDTH_KD_SIZES
    width_kd_data: str | None = None  # text or token file width-kd trains on (default: train_text)
    width_kd_tokens: int | None = None  # training tokens of each width-kd run (default: the fit's)
    width_mlp_group: int = 32  # MLP channels per unit of the width cuts
    width_kd_checkpoint_every: int = 500  # steps
    width_kd_stop_after: float | None = None  # seconds from the start: width-kd stops with a checkpoint
    fit_eval_windows: int = 0  # windows of the training text's end held out of the fits, evaluated during them
    fit_stop_after: float | None = None  # seconds: a fit stops with a checkpoint; the next run resumes it
    token_nll_dir: str | None = None  # every evaluated token's NLL, one file per record (benchmarks/token_nll.py)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        for size in (*self.sizes, *self.ablation_sizes, *self.finetune_sizes):
            if not 0 < size <= 1:
                raise ValueError(f"sizes are fractions in (0, 1], got {size}")
        if self.autocast not in ("bf16", "none"):
            raise ValueError(f"autocast must be 'bf16' or 'none', got {self.autocast!r}")
        needs_fit_tokens = any(m in FIT_TOKENS_METHODS for m in self.methods)
        reads_fit_tokens = any(m in (*FIT_TOKENS_METHODS, *MIXING_METHODS) for m in self.methods)
        if needs_fit_tokens and self.fit_tokens is None:
            raise ValueError(f"{', '.join(FIT_TOKENS_METHODS)} fit on --fit-tokens, a token file or store from "
                             "`ppn-bayes teacher-text`: give it")
        if self.fit_tokens is not None and not reads_fit_tokens:
            raise ValueError(f"--fit-tokens is read by {', '.join((*FIT_TOKENS_METHODS, *MIXING_METHODS))} only, "
                             "and none of them runs")
        if self.fit_tokens is not None and needs_fit_tokens and len(data_paths(self.fit_tokens)) != 1:
            raise ValueError(f"{', '.join(FIT_TOKENS_METHODS)} fit on one token file; --fit-tokens names "
                             f"{self.fit_tokens!r}")
        for spec, flag in ((self.fit_tokens, "--fit-tokens"), (self.width_kd_data, "--width-kd-data")):
            for path in data_paths(spec) if spec is not None else ():
                if not path.exists():
                    raise ValueError(f"{flag} {path}: no such file or folder")
        if self.fit_eval_windows < 0:
            raise ValueError(f"fit_eval_windows must not be negative, got {self.fit_eval_windows}")
        if self.fit_stop_after is not None and not self.fit_stop_after > 0:
            raise ValueError(f"fit_stop_after must be positive, got {self.fit_stop_after}")
        if self.limit_windows is not None and self.limit_windows < 1:
            raise ValueError(f"limit_windows must be positive, got {self.limit_windows}")
        for size in self.width_kd_sizes:
            if not 0 < size <= 1:
                raise ValueError(f"sizes are fractions in (0, 1], got {size}")
        if self.width_mlp_group < 1:
            raise ValueError(f"width_mlp_group must be positive, got {self.width_mlp_group}")
        if self.width_kd_checkpoint_every < 0:
            raise ValueError(f"width_kd_checkpoint_every must not be negative, got {self.width_kd_checkpoint_every}")
        if self.width_kd_stop_after is not None and not self.width_kd_stop_after > 0:
            raise ValueError(f"width_kd_stop_after must be positive, got {self.width_kd_stop_after}")
        for method in (m for m in self.methods if method_of(m).builder == "width cut, distilled"):
            if self.width_kd_steps < 1:
                raise ValueError(f"{method}: {self.width_kd_tokens} training tokens make no step of "
                                 f"{self.fit.batch_size} x {self.fit.seq_len} tokens")

    @property
    def width_kd_steps(self) -> int:
        """Steps of each width-kd run: its tokens over the fit's batch of windows."""
        tokens = self.width_kd_tokens
        if tokens is None:
            tokens = self.fit.steps * self.fit.batch_size * self.fit.seq_len
        return int(tokens) // (self.fit.batch_size * self.fit.seq_len)

    @property
    def name(self) -> str:
        """The model's name in records: the GGUF file's stem without its quantisation."""
        return self.model_name or Path(self.model).name.split(".")[0]


# -- loading, with a cache of the dequantised LM and the tokens -------------------------------------
def load_inputs(config: QualityConfig):
    """``(lm, tokenizer, eval_tokens, train_tokens)``; a GGUF model and its tokens are
    cached under ``work_dir`` (converting GGUF takes a minute; the cache loads in seconds)."""
    from ppn_bayes.lm import load_lm, save_lm

    model = Path(config.model)
    cache = Path(config.work_dir) / "model"
    if model.suffix == ".gguf" and (cache / "config.json").is_file():
        lm, tokenizer = load_lm(cache)
    else:
        lm, tokenizer = load_lm(model)
        if model.suffix == ".gguf":
            try:
                save_lm(lm, tokenizer, cache)
            except (FileExistsError, OSError) as err:  # another process made it first
                print(f"[quality] model cache not written: {err}", file=sys.stderr)
    tokens = []
    for name, path in (("eval", config.eval_text), ("train", config.train_text)):
        cached = Path(config.work_dir) / "tokens" / f"{config.name}-{Path(path).stem}.safetensors"
        if cached.is_file():
            tokens.append(load_tokens(cached))
            continue
        ids = load_tokens(path, tokenizer)
        save_tokens(cached, ids)
        tokens.append(ids)
    return lm.to(config.device).float().eval(), tokenizer, tokens[0], tokens[1]


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """State shared by the methods of one run."""

    config: QualityConfig
    lm: torch.nn.Module
    tokenizer: object
    eval_tokens: torch.Tensor
    train_tokens: torch.Tensor
    began: float = field(default_factory=time.perf_counter)
    records: list = field(default_factory=list)
    skipped: int = 0  # sizes left out for lack of time
    _calibration: torch.Tensor | None = None
    _ordered: tuple | None = None  # activation_ordered's LM and column scores

    @property
    def arch(self):
        return describe(self.lm, mlp_group=self.config.fit.mlp_group)

    def out_of_time(self) -> bool:
        budget = self.config.time_budget
        return budget is not None and time.perf_counter() - self.began > budget

    def calibration(self) -> torch.Tensor:
        """The protocol's calibration windows of the training text (seeded)."""
        if self._calibration is None:
            from ppn_bayes.inspect.baselines import calibration_windows

            c = self.config
            self._calibration = calibration_windows(self.train_tokens, c.calib_windows, c.calib_seq_len,
                                                    c.calib_seed)
        return self._calibration

    def dense_copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.lm)

    def evaluate(self, lm) -> "object":
        torch.set_float32_matmul_precision("highest")
        return perplexity(lm.float(), self.eval_tokens, seq_len=self.config.seq_len,
                          limit=self.config.limit_windows, batch_size=self.config.eval_batch,
                          per_token=self.config.token_nll_dir is not None)

    def record(self, method: str, *, size_requested: float, size_reached: float, result, train_tokens: int,
               settings: dict, **figures) -> dict:
        c = self.config
        settings = {
            "eval_text": Path(c.eval_text).name, "eval_dtype": "float32", "device": c.device,
            **settings,
        }
        if result.token_nll is not None:  # --token-nll-dir
            figures["nll_by_context"] = result.nll_by_context()
            self.save_token_nll(method, size_requested, result)
        record = append_record(
            "quality", method=method, model=c.name, records_dir=c.records_dir,
            size_requested=size_requested, size_reached=size_reached, ppl=result.ppl, nll=result.nll,
            windows=result.windows, seq_len=result.seq_len, train_tokens=train_tokens,
            quick=c.quick or c.limit_windows is not None, settings=settings, **figures,
        )
        self.records.append(record)
        print(f"[quality] {method:22s} size {size_requested:.2f} -> {size_reached:.4f}  "
              f"ppl {result.ppl:10.3f}  ({time.perf_counter() - self.began:.0f} s)", flush=True)
        return record

    def save_token_nll(self, method: str, size: float, result) -> None:
        """Every evaluated token's NLL (float16 ``[windows, seq_len - 1]``: ~0.1% of the value,
        for analyses that average thousands of tokens) to ``TOKEN_NLL_DIR/METHOD@SIZE.safetensors``,
        and the windows' targets once, ``targets.safetensors`` (int32): what
        ``benchmarks/token_nll.py`` packs and analyses."""
        from safetensors.torch import save_file

        folder = Path(self.config.token_nll_dir)
        targets = folder / "targets.safetensors"
        if not targets.is_file():
            windows = TokenBlocks(self.eval_tokens, self.config.seq_len).windows(self.config.limit_windows)
            with atomic_file(targets) as tmp:
                save_file({"targets": windows[:, 1:].to(torch.int32).contiguous()}, str(tmp))
        with atomic_file(folder / f"{method}@{size:g}.safetensors") as tmp:
            save_file({"nll": result.token_nll.to(torch.float16).contiguous()}, str(tmp),
                      metadata={"method": method, "size": f"{size:g}", "nll": repr(result.nll)})

    def save_ranking(self, method: str, ranking, **extra) -> None:
        """Add ``method``'s ranking to the rankings file (small JSON; speed.py reads it)."""
        if self.config.rankings is None:
            return
        path = Path(self.config.rankings)
        data = json.loads(path.read_text()) if path.is_file() else {"format": "ppn_bayes.rankings",
                                                                      "format_version": 1, "rankings": {}}
        data["rankings"][method] = {
            "model": self.config.name,
            "architecture": ranking.arch.to_dict(),
            **ranking.to_dict(),
            **extra,
        }
        atomic_write_text(path, json.dumps(data))


def _autocast_used(config: QualityConfig) -> str:
    """The autocast that applies: bf16 only on CUDA (CPU fits run in float32)."""
    return "bf16" if config.autocast == "bf16" and torch.device(config.device).type == "cuda" else "none"


def _autocast(config: QualityConfig):
    import contextlib

    if _autocast_used(config) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _subnetwork(lm, masks, subnetwork_of=None):
    """The sliced sub-network (deployment helper's ``build_subnetwork``, or a fit's
    ``subnetwork_of``), its decoder parameter count checked against the masks."""
    from ppn_bayes.deploy.subnetwork import build_subnetwork, held_params

    sub = build_subnetwork(lm, masks) if subnetwork_of is None else subnetwork_of(masks)
    return sub, held_params(sub, masks)


def evaluate_ranking(run: Run, method: str, lm, ranking, sizes, *, train_tokens: int, settings: dict,
                     subnetwork_of=None):
    """Slice ``lm`` at every size of ``ranking`` and record the sub-networks' perplexity;
    ``subnetwork_of`` (a ppn_bayes fit's :meth:`~ppn_bayes.train.state.PuppetFit.subnetwork_of`):
    what cuts the masks instead, from the LM with the size adapters' correction of their size
    merged (``size_rank > 0``; in place and undone, no copy of the LM)."""
    for size in sizes:
        if run.out_of_time():
            print(f"[quality] out of time: {method} at {size} skipped", flush=True)
            run.skipped += 1
            return
        masks = ranking.masks(size)
        sub, kept = _subnetwork(lm, masks, subnetwork_of)
        result = run.evaluate(sub)
        run.record(method, size_requested=size, size_reached=masks.size_reached, result=result,
                   train_tokens=train_tokens, settings=settings, params_kept=kept,
                   layers_kept=sub.config.num_hidden_layers, evaluated="subnetwork")
        del sub


# -- methods -----------------------------------------------------------------------------------------
def run_dense(run: Run, method: str) -> None:
    result = run.evaluate(run.lm)
    run.record("dense", size_requested=1.0, size_reached=1.0, result=result, train_tokens=0,
               settings={"training": "none"}, params_kept=run.arch.total_cost, evaluated="dense")


def fit_config_of(config: QualityConfig, method: str) -> FitConfig:
    """The fit of ``method``: the fit of record, with the ablation's or variant's changes."""
    return config.fit.replace(**fit_changes(method, steps=config.fit.steps))


def sizes_per_step(fit_config: FitConfig) -> int:
    """The networks a step of the fit trains, each on its share of the rows: the gated sizes
    (``size_min``, the ``train_sizes``, the random ones) and the full LM where it has rows."""
    from ppn_bayes.train.step import step_sizes

    return len(step_sizes(fit_config, 0)) + int(fit_config.full_lm_rows)


def run_ppn(run: Run, method: str) -> None:
    from ppn_bayes.fit import fit, load_fit, read_state

    c = run.config
    fit_config = fit_config_of(c, method)
    tokens, train_text = _fit_tokens(run, method)
    checkpoint = Path(c.work_dir) / "fits" / method
    target = checkpoint.with_name(f"{method}.steps.json")  # the steps a time-boxed fit settled on
    if c.fit_time_budget is not None and target.is_file() and (checkpoint / "state.json").is_file():
        fit_config = fit_config.replace(steps=json.loads(target.read_text())["steps"])
    done = (checkpoint / "state.json").is_file() and read_state(checkpoint)["step"] >= fit_config.steps
    if done:
        fitted = load_fit(checkpoint, device=c.device)
        seconds, tokens_per_s = None, None
        print(f"[quality] {method}: reusing the finished fit at {checkpoint}", flush=True)
    else:
        resume = (checkpoint / "state.json").is_file()
        lm = run.dense_copy()
        probe_seconds, probe_tokens = 0.0, 0
        with _autocast(c):
            if c.fit_time_budget is not None and not resume:
                # the probe trains a copy of its own: the fit resumes from the dense LM it started from
                # (a teacher='original' fit checks that)
                fit_config, probe = _time_boxed_steps(run, run.dense_copy(), fit_config, checkpoint, tokens)
                probe_seconds, probe_tokens = probe.result.seconds, probe.result.train_tokens
                atomic_write_text(target, json.dumps({"steps": fit_config.steps}))
                resume = True
            _, held_out = _fit_split(run)
            log = checkpoint.with_name(f"{method}.validation.jsonl")
            log.parent.mkdir(parents=True, exist_ok=True)

            def on_evaluation(row: dict) -> None:
                with open(log, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"[quality] {method} step {row['step']}: full {math.exp(row['nll_full']):.1f}, " + ", ".join(
                    f"{r['size']:g} {math.exp(r['nll']):.1f} (stable {r['stability'] if r['stability'] is None else round(r['stability'], 3)}, "
                    f"ambiguous {r['ambiguous']:.3f})" for r in row["sizes"]), flush=True)

            fitted = fit(lm, tokens, fit_config, checkpoint=checkpoint, resume=resume, tokenizer=run.tokenizer,
                         progress=False, eval_tokens=held_out, on_evaluation=on_evaluation,
                         stop_after=c.fit_stop_after)
        if fitted.result.steps_done < fit_config.steps:
            print(f"[quality] {method}: stopped at step {fitted.result.steps_done} of {fit_config.steps} "
                  f"(--fit-stop-after); the same command again resumes it", flush=True)
            run.skipped += 1
            return
        # this process's training: the probe's and the (resumed) rest's, checkpoints excluded
        seconds = probe_seconds + fitted.result.seconds
        tokens_here = probe_tokens + fitted.result.tokens_per_s * fitted.result.seconds
        tokens_per_s = tokens_here / seconds if seconds > 0 else None
        print(f"[quality] {method}: fit of {fitted.result.train_tokens} tokens, {seconds:.0f} s of training "
              f"here ({tokens_per_s or 0:.0f} tokens/s)", flush=True)
    fitted.lm.float().eval()
    ranking = fitted.ranking()
    train_tokens = fit_config.steps * fit_config.batch_size * fit_config.seq_len
    history = fitted.result.history
    settings = {
        "training": f"ppn_bayes fit (teacher {fit_config.teacher}, sandwich rule, {fit_config.gate_coupling} gates)",
        "fit": fit_config.to_dict(),
        "ablation": ABLATIONS.get(method, {}), "variant": VARIANTS.get(method, {}), "autocast": _autocast_used(c), **train_text,
        "sizes_per_step": sizes_per_step(fit_config), "fit_seconds": seconds,
        "validation": [{k: v for k, v in row.items() if k != "sizes"} | {"sizes": [
            {k: v for k, v in r.items() if k != "kept"} for r in row.get("sizes", [])]}
            for row in fitted.result.validation],
        "fit_tokens_per_s": tokens_per_s, "final_loss": history[-1] if history else None,
        "checkpoint": str(checkpoint),
    }
    run.save_ranking(method, ranking, train_tokens=train_tokens, fit=fit_config.to_dict())
    if method == RECORD and not fit_config.size_rank:  # a ranked checkpoint cannot carry size adapters
        _export_ranked(run, fitted)
    sizes = c.sizes if method == RECORD else c.ablation_sizes
    evaluate_ranking(run, method, fitted.lm, ranking, sizes, train_tokens=train_tokens, settings=settings,
                     subnetwork_of=fitted.subnetwork_of)


def _fit_tokens(run: Run, method: str) -> tuple[torch.Tensor, dict]:
    """What a ppn_bayes fit reads, and how its records name it: the training text (less its
    held-out end, ``fit_eval_windows``), mixed half and half row by row with ``--fit-tokens``
    for the mixing methods when it is given, or for ppn_bayes-teacher the token file alone."""
    c = run.config
    train, _ = _fit_split(run)
    held = {"fit_eval_windows": c.fit_eval_windows} if c.fit_eval_windows else {}
    if c.fit_tokens is not None and method in MIXING_METHODS:
        mixture, name = _mixed(run, c.fit_tokens)
        return mixture, {"train_text": name, "fit_data": mixture.identity(), **held}
    if method not in FIT_TOKENS_METHODS:
        return train, {"train_text": Path(c.train_text).name, **held}
    tokens, header = _token_file(run, c.fit_tokens)
    return tokens, {"train_text": Path(c.fit_tokens).name, "fit_tokens_header": header,
                    "fit_tokens_count": tokens.numel(), "prompts_from": Path(c.train_text).name}


def data_paths(spec: str) -> list[Path]:
    """The paths of a ``--fit-tokens`` or ``--width-kd-data`` value: one path, or several
    separated by commas."""
    return [Path(part) for part in str(spec).split(",") if part]


def _mixed(run: Run, spec) -> tuple[object, str]:
    """The training text (less its held-out end) and each token file or store of ``spec``
    (:func:`data_paths`), mixed row by row in equal shares (half and half with one store, a
    third each with two) with the fit's windows and seed, and its name for the records."""
    from ppn_bayes.store import Mixture, TokenSource, open_source

    c = run.config
    train, _ = _fit_split(run)
    stores = data_paths(spec)
    sources = [TokenSource.from_tensor(train), *(open_source(p, vocab_size=vocab_rows(run.lm)) for p in stores)]
    mixture = Mixture(sources, [1 / len(sources)] * len(sources), seq_len=c.fit.seq_len, seed=c.fit.seed)
    share = "half and half" if len(sources) == 2 else f"1/{len(sources)} each"
    return mixture, f"{' + '.join([Path(c.train_text).name, *(p.name for p in stores)])}, {share}"


def _fit_split(run: Run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(train, held_out)``: the training text less its last ``fit_eval_windows`` windows of
    the fit's length, and those windows (``None`` without them). Held-out text for the
    diagnostics during a fit: the evaluation text is for the records alone."""
    c = run.config
    n = c.fit_eval_windows * c.fit.seq_len
    if n == 0:
        return run.train_tokens, None
    if n >= run.train_tokens.numel() // 2:
        raise ValueError(f"fit_eval_windows={c.fit_eval_windows} would hold out half the training text or more")
    return run.train_tokens[:-n], run.train_tokens[-n:]


def _token_file(run: Run, path) -> tuple[torch.Tensor, dict]:
    """The tokens of a ``.safetensors`` token file, checked against the LM's vocabulary,
    and its header's metadata."""
    from safetensors import safe_open

    tokens = load_tokens(path)
    check_token_ids(tokens, vocab_rows(run.lm), str(path))
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata() or {}
    return tokens, header


def _file_sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def width_kd_data(run: Run) -> tuple[torch.Tensor, dict]:
    """What width-kd trains on, and its identity for the records: ``--width-kd-data`` (a
    ``.safetensors`` token file, a text tokenised whole, or one or more token store folders,
    comma-separated, which are mixed with the training text in equal shares as the fit of
    record mixes ``--fit-tokens``) or the training text."""
    c = run.config
    path = Path(c.width_kd_data or c.train_text)
    if path.is_dir() or len(data_paths(path)) > 1:
        mixture, name = _mixed(run, c.width_kd_data)
        return mixture, {"data": name, "fit_data": mixture.identity()}
    if path.suffix == ".safetensors":
        tokens, header = _token_file(run, path)
    elif c.width_kd_data is None:
        tokens, header = run.train_tokens, {}
    else:
        tokens, header = load_tokens(path, run.tokenizer), {}
        check_token_ids(tokens, vocab_rows(run.lm), str(path))
    return tokens, {"data": path.name, "data_sha256": _file_sha256(path), "data_tokens": int(tokens.numel()),
                    "data_header": header}


def _time_boxed_steps(run: Run, lm, fit_config: FitConfig, checkpoint: Path, tokens: torch.Tensor):
    """Fit ``PROBE_STEPS`` steps, measure the throughput, and return ``fit_config`` with as
    many steps as ``fit_time_budget`` allows (never more than asked), and the probe's fit. The fit then resumes
    from the probe's checkpoint: with a constant learning rate and data that are a pure
    function of the step, this equals one uninterrupted fit of the final step count."""
    from ppn_bayes.fit import fit

    probe = fit_config.replace(steps=min(PROBE_STEPS, fit_config.steps))
    probed = fit(lm, tokens, probe, checkpoint=checkpoint, tokenizer=run.tokenizer, progress=False)
    seconds_per_step = probed.result.seconds / probe.steps  # the training loop, its warm-up included
    affordable = int(run.config.fit_time_budget / seconds_per_step)
    steps = max(probe.steps, min(fit_config.steps, affordable // 10 * 10))
    print(f"[quality] fit probe: {seconds_per_step:.2f} s/step; {steps} steps fit in "
          f"{run.config.fit_time_budget:.0f} s (asked {fit_config.steps})", flush=True)
    return fit_config.replace(steps=steps), probed


def _export_ranked(run: Run, fitted) -> None:
    """A ranked checkpoint of the fit of record under ``work_dir/ranked/ppn_bayes``, for
    benchmarks/resize.py and speed.py (before, a name clash, ``ppn_bayes.resize`` the function
    and not the module, made this silently write nothing)."""
    from ppn_bayes import export_ranked

    target = Path(run.config.work_dir) / "ranked" / "ppn_bayes"
    if target.exists():
        return
    try:
        export_ranked(fitted, target, tokenizer=run.tokenizer)
        print(f"[quality] ranked checkpoint written to {target}", flush=True)
    except Exception as err:  # the benchmark goes on; the failure is reported
        print(f"[quality] ranked export failed: {err!r}", file=sys.stderr, flush=True)


#: How the activation baselines score units (their records say so; the score before issue 15,
#: "mean |W_ij| * rms(X_j) of owned weights", was mostly weight magnitude).
ACTIVATION_SCORE = ("activation: an attention unit's mean squared output norm (its query heads' channels into "
                    "o_proj), an MLP unit's summed mean |activation| of its channels (into down_proj); MLP channels "
                    "ordered by that score first, so a unit of g channels is g channels of similar score")


def _calibration_settings(run: Run) -> dict:
    windows = run.calibration()
    return {"calibration_windows": len(windows), "calibration_seq_len": int(windows.shape[1]),
            "calibration_seed": run.config.calib_seed, "calibration_text": Path(run.config.train_text).name}


def activation_ordered(run: Run, arch):
    """``(lm, scores [L, U])``: a copy of the dense LM with every layer's MLP channels in
    descending order of their activation score (the same function), and the units'
    activation scores in it. The copy and the column scores are made once a run."""
    from ppn_bayes.inspect import baselines

    if run._ordered is None:
        attention, mlp = baselines.activation_column_scores(run.lm, run.calibration(),
                                                            batch_size=run.config.eval_batch)
        lm = run.dense_copy()
        run._ordered = (lm, attention, baselines.order_mlp_channels(lm, mlp))
    lm, attention, mlp = run._ordered
    return lm, baselines.unit_scores_from_columns(arch, attention, mlp)


def structured_ranking(run: Run, method: str):
    """``(lm, ranking, settings)``: the ShortGPT, magnitude or activation ranking of the
    dense LM, and the LM to cut with it (for the activation rankings, the dense LM with its
    MLP channels in the order of their scores)."""
    from ppn_bayes.inspect import baselines

    base = method_of(method).base or method
    arch = run.arch
    to_ranking = baselines.ranking_from_scores
    if base.endswith("-uniform"):
        to_ranking = baselines.uniform_ranking_from_scores
    allocation = {"allocation": "every layer cut by the same fraction (Wanda-sp)" if base.endswith("-uniform")
                  else "global: one ranking of all units by score, each layer before its best unit"}
    if base.startswith("magnitude"):
        scores = baselines.magnitude_scores(run.lm, arch)
        return run.lm, to_ranking(arch, scores), {"score": "mean squared weight of owned weights", **allocation}
    if base == "shortgpt":
        influence = baselines.block_influence(run.lm, run.calibration(), batch_size=run.config.eval_batch)
        return run.lm, baselines.shortgpt_ranking(arch, influence), {**_calibration_settings(run),
                                                                     "block_influence": influence.tolist()}
    lm, scores = activation_ordered(run, arch)
    return lm, to_ranking(arch, scores), {**_calibration_settings(run), "score": ACTIVATION_SCORE, **allocation}


def run_structured(run: Run, method: str) -> None:
    lm, ranking, settings = structured_ranking(run, method)
    run.save_ranking(method, ranking)
    evaluate_ranking(run, method, lm, ranking, run.config.sizes, train_tokens=0,
                     settings={"training": "none", **settings})


def distill_settings(fit_config: FitConfig, steps: int, **changes):
    """The :class:`ppn_bayes.deploy.finetune.DistillConfig` of a fine-tune of ``steps`` steps with
    the fit's batch, windows, AdamW at ``lr_lm`` and ``adam_beta2``, loss weights, schedule (its
    warm-up the same share of the steps), clipping, seed and compiler."""
    from ppn_bayes.deploy.finetune import DistillConfig

    warmup = round(fit_config.warmup_steps * steps / fit_config.steps)  # the same share of the run
    return DistillConfig(steps=steps, batch_size=fit_config.batch_size, seq_len=fit_config.seq_len,
                         lr=fit_config.lr_lm, weight_decay=fit_config.weight_decay,
                         adam_beta2=fit_config.adam_beta2,
                         distill_weight=fit_config.distill_weight, nll_weight=fit_config.nll_weight,
                         lr_schedule=fit_config.lr_schedule, warmup_steps=warmup, grad_clip=fit_config.grad_clip,
                         seed=fit_config.seed, compile=fit_config.compile, **changes)


def distill_finetune(student, teacher, tokens: torch.Tensor, fit_config: FitConfig, *, config: QualityConfig,
                     repeat: int = 1) -> dict:
    """Fine-tune ``student`` towards ``teacher`` on ``tokens`` with ``repeat`` times the fit's budget
    (steps, batch, windows, AdamW at ``lr_lm``): :func:`ppn_bayes.deploy.finetune.distill`, the
    next-token loss plus ``distill_weight`` · KL(teacher ‖ student) per token."""
    from ppn_bayes.deploy.finetune import distill

    settings = distill_settings(fit_config, fit_config.steps * repeat)
    result = distill(student, teacher, tokens, settings, autocast=lambda: _autocast(config), progress=False)
    return {"finetune_seconds": result.seconds, "final_loss": result.history[-1]["loss"]}


def _finetune_sizes(run: Run, method: str, lm, ranking, fit_config: FitConfig, *, train_tokens: int,
                    settings: dict, repeat: int = 1, subnetwork_of=None) -> None:
    """Cut ``lm`` (or through ``subnetwork_of``, as :func:`evaluate_ranking`) at every ``finetune_sizes``
    of ``ranking``, fine-tune each sub-network towards the dense LM (:func:`distill_finetune`)
    and record its perplexity."""
    c = run.config
    for size in c.finetune_sizes:
        if run.out_of_time():
            print(f"[quality] out of time: {method} at {size} skipped", flush=True)
            run.skipped += 1
            return
        masks = ranking.masks(size)
        sub, kept = _subnetwork(lm, masks, subnetwork_of)
        sub.float()
        cost = distill_finetune(sub, run.lm, run.train_tokens, fit_config, config=c, repeat=repeat)
        result = run.evaluate(sub)
        run.record(method, size_requested=size, size_reached=masks.size_reached, result=result,
                   train_tokens=train_tokens, params_kept=kept, layers_kept=sub.config.num_hidden_layers,
                   evaluated="subnetwork",
                   settings={"fit": fit_config.to_dict(), "autocast": _autocast_used(c), **settings, **cost})
        del sub


def run_finetuned(run: Run, method: str) -> None:
    fit_config = run.config.fit
    lm, ranking, settings = structured_ranking(run, method)
    _finetune_sizes(run, method, lm, ranking, fit_config,
                    train_tokens=fit_config.steps * fit_config.batch_size * fit_config.seq_len,
                    settings={"training": "self-distillation fine-tune of the pruned sub-network (optional "
                                          "baseline: the same budget as the ppn_bayes fit)", **settings})


def run_ppn_finetuned(run: Run, method: str) -> None:
    """The sub-network of the fit ``<fit>`` of ``<fit>+distill`` (the fit of record for
    ppn_bayes+distill) at each ``finetune_sizes``, fine-tuned like the +distill baselines
    (self-distillation from the dense LM, the fit's budget once more; ``protocol.LONG_FINETUNE``
    times that for ``<fit>+distill-long``): what a fit plus a
    fine-tune of one chosen size reaches. Fits ``<fit>`` first when ``work_dir`` holds no
    finished fit of it (recording its rows as that method does)."""
    from ppn_bayes.fit import load_fit, read_state

    c = run.config
    base = method_of(method).base
    repeat = method_of(method).finetune_repeat
    fit_config = fit_config_of(c, base)
    checkpoint = Path(c.work_dir) / "fits" / base
    if not ((checkpoint / "state.json").is_file() and read_state(checkpoint)["step"] >= fit_config.steps):
        run_ppn(run, base)
    fitted = load_fit(checkpoint, device=c.device)
    fitted.lm.float().eval()
    fit_tokens = fit_config.steps * fit_config.batch_size * fit_config.seq_len
    _finetune_sizes(run, method, fitted.lm, fitted.ranking(), fit_config, train_tokens=(1 + repeat) * fit_tokens,
                    repeat=repeat, subnetwork_of=fitted.subnetwork_of,
                    settings={"training": f"the {base} fit, then a self-distillation fine-tune of "
                                          "its sub-network at this size (the +distill baselines' recipe)",
                              "fit_tokens": fit_tokens, "finetune_tokens": repeat * fit_tokens,
                              "checkpoint": str(checkpoint)})


def width_scores(run: Run):
    """``(lm, arch, scores, settings)`` of the width cuts: the dense LM with its MLP
    channels in the order of their activation scores, its units of ``width_mlp_group``
    channels, and their activation scores on the calibration windows."""
    c = run.config
    arch = describe(run.lm, mlp_group=c.width_mlp_group)
    lm, scores = activation_ordered(run, arch)
    return lm, arch, scores, {"score": ACTIVATION_SCORE, "mlp_group": c.width_mlp_group,
                              "allocation": "uniform width cut: every layer kept, the same KV groups and MLP "
                                            "channel groups in each, the widths closest to the size without "
                                            "exceeding it", **_calibration_settings(run)}


def _width_figures(masks) -> dict:
    """The shape of a uniform cut, for its record."""
    arch = masks.arch
    return {"params_kept": masks.kept_params, "layers_kept": int(masks.layer.sum()), "evaluated": "subnetwork",
            "kv_groups": int(masks.unit[0, :arch.n_attention_units].sum()), "kv_groups_of": arch.n_attention_units,
            "mlp_channels": int(masks.unit[0, arch.n_attention_units:].sum()) * arch.mlp_group,
            "mlp_channels_of": arch.intermediate_size}


def run_width(run: Run, method: str) -> None:
    """The uniform width cut at every size, no training."""
    from ppn_bayes.inspect.baselines import uniform_cut_for_size

    lm, arch, scores, settings = width_scores(run)
    for size in run.config.sizes:
        if run.out_of_time():
            print(f"[quality] out of time: {method} at {size} skipped", flush=True)
            run.skipped += 1
            return
        masks = uniform_cut_for_size(arch, scores, size)
        sub, _ = _subnetwork(lm, masks)
        result = run.evaluate(sub)
        run.record(method, size_requested=size, size_reached=masks.size_reached, result=result, train_tokens=0,
                   settings={"training": "none", **settings}, **_width_figures(masks))
        del sub


def run_width_kd(run: Run, method: str) -> None:
    """The uniform width cut at each ``width_kd_sizes``, distilled from the dense LM with
    :func:`ppn_bayes.deploy.finetune.distill` (one run per size), checkpointed under
    ``work_dir/<method>/<size>`` (``width-kd/0.5``) and resumed there; a finished size is not run again. With
    ``width_kd_stop_after`` a run stops with a checkpoint at the first step past that many
    seconds from the start, records nothing, and leaves the later sizes for the next run."""
    from ppn_bayes.inspect.baselines import uniform_cut_for_size
    from ppn_bayes.deploy.finetune import distill

    c = run.config
    tokens, data = width_kd_data(run)
    lm, arch, scores, settings = width_scores(run)
    steps = c.width_kd_steps
    schedule = distill_settings(c.fit, steps, checkpoint_every=c.width_kd_checkpoint_every)
    train_tokens = steps * schedule.batch_size * schedule.seq_len
    for size in c.width_kd_sizes:
        work = Path(c.work_dir) / method / f"{size:g}"
        if (work / "done.json").is_file():
            print(f"[quality] {method} at {size}: recorded in an earlier run ({work / 'done.json'})", flush=True)
            continue
        if run.out_of_time():
            print(f"[quality] out of time: {method} at {size} skipped", flush=True)
            run.skipped += 1
            return
        masks = _width_kd_masks(work, uniform_cut_for_size(arch, scores, size))
        sub, _ = _subnetwork(lm, masks)
        sub.float()
        checkpoint = work / "checkpoint"
        resume = (checkpoint / "state.json").is_file()
        untrained = None if resume else run.evaluate(sub).ppl
        stop_after = None  # counted from the run's start; already past it, one step is taken and kept
        if c.width_kd_stop_after is not None:
            stop_after = max(c.width_kd_stop_after - (time.perf_counter() - run.began), 1e-3)
        result = distill(sub, run.lm, tokens, schedule, autocast=lambda: _autocast(c), progress=False,
                         checkpoint=checkpoint, resume=resume, stop_after=stop_after)
        if result.stopped_at is not None:
            print(f"[quality] {method} at {size} stopped at step {result.stopped_at} of {steps} with a checkpoint "
                  f"({result.tokens_per_s:.0f} tokens/s here; --width-kd-stop-after); the same command again "
                  "resumes it", flush=True)
            run.skipped += 1
            return
        evaluated = run.evaluate(sub)
        record = run.record(
            method, size_requested=size, size_reached=masks.size_reached, result=evaluated,
            train_tokens=train_tokens, ppl_untrained=untrained, **_width_figures(masks),
            settings={"training": "distillation from the dense LM (ppn_bayes.deploy.finetune.distill: next-token loss "
                                  "+ distill_weight x full-logit KL(dense || cut)), the fit's batch, windows and "
                                  "lr_lm", **settings, **data, "distill": schedule.to_dict(),
                      "autocast": _autocast_used(c), "resumed_from_step": result.resumed_from,
                      "finetune_seconds": result.seconds, "finetune_tokens_per_s": result.tokens_per_s,
                      "final_loss": result.history[-1] if result.history else None})
        atomic_write_text(work / "done.json", json.dumps(record, default=str))
        shutil.rmtree(checkpoint, ignore_errors=True)  # its work is in the record now
        del sub


def _width_kd_masks(work: Path, masks):
    """``masks``, or the ones an interrupted run of this size saved in ``work``: a resumed
    fine-tune continues the sub-network it started with, whatever the scores say now."""
    from ppn_bayes.core.ranking import Masks

    path = work / "masks.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        unit = torch.tensor(saved["unit"], dtype=torch.bool)
        if tuple(unit.shape) != tuple(masks.unit.shape) or saved["kept_params"] != masks.kept_params:
            raise ValueError(f"{path} holds the masks of another cut; remove {work} to start this size again")
        return Masks(arch=masks.arch, layer=masks.layer, unit=unit, size_requested=masks.size_requested,
                     kept_params=masks.kept_params, total_params=masks.total_params)
    atomic_write_text(path, json.dumps({"unit": masks.unit.tolist(), "kept_params": masks.kept_params}))
    return masks


def run_sparse(run: Run, method: str) -> None:
    from importlib.metadata import version

    from ppn_bayes.inspect.baselines import sparse_prune

    c = run.config
    base, _, structure = method.partition("-")
    structure = structure or "0:0"
    sizes = (N_M_SIZE,) if structure == "2:4" else c.sizes
    windows = run.calibration()
    for size in sizes:
        if run.out_of_time():
            print(f"[quality] out of time: {method} at {size} skipped", flush=True)
            run.skipped += 1
            return
        lm = run.dense_copy()
        began = time.perf_counter()
        pruned = sparse_prune(lm, run.tokenizer, windows, method=base, sparsity=round(1 - size, 6),
                              mask_structure=structure, arch=run.arch)
        seconds = time.perf_counter() - began
        result = run.evaluate(lm)
        run.record(method, size_requested=size, size_reached=pruned.size_reached, result=result, train_tokens=0,
                   evaluated="dense matrices with zeros",
                   settings={"training": "none (one-shot, calibration only)", "implementation": "llm-compressor",
                             "llmcompressor": version("llmcompressor"), "sparsity": pruned.sparsity,
                             "mask_structure": structure, "targets": "decoder Linear layers (lm_head dense)",
                             "calibration_windows": len(windows), "calibration_seq_len": int(windows.shape[1]),
                             "calibration_seed": c.calib_seed, "calibration_text": Path(c.train_text).name,
                             "prune_seconds": seconds})
        if c.save_sparse == f"{method}@{size}":
            _save_sparse(run, method, size, lm)
        del lm


def _save_sparse(run: Run, method: str, size: float, lm) -> None:
    """The pruned weights (bf16 safetensors), for speed.py to time them as they deploy."""
    from safetensors.torch import save_model

    path = Path(run.config.work_dir) / "sparse" / f"{method.replace(':', '')}-{size}.safetensors"
    with atomic_file(path) as tmp:
        save_model(copy.deepcopy(lm).to(torch.bfloat16), str(tmp))
    print(f"[quality] pruned weights of {method} at {size} written to {path}", flush=True)


#: What builds each kind of method (``protocol.BUILDERS``): every method quality.py runs has one.
RUNNERS = {"dense LM": run_dense, "fit": run_ppn, "ranking": run_structured, "ranking+distill": run_finetuned,
           "fit+distill": run_ppn_finetuned, "width cut": run_width, "width cut, distilled": run_width_kd,
           "one-shot pruning": run_sparse}


def run_quality(config: QualityConfig, *, keep_going: bool = True, skip_done: bool = False) -> list[dict]:
    """Measure every method of ``config`` in order; return the records written.

    A method whose every size was measured is marked done under ``work_dir/done``; with
    ``skip_done`` such methods are skipped (so that a part of the GPU job can be rerun)."""
    lm, tokenizer, eval_tokens, train_tokens = load_inputs(config)
    run = Run(config, lm, tokenizer, eval_tokens, train_tokens)
    print(f"[quality] {config.name}: {eval_tokens.numel()} eval tokens "
          f"({eval_tokens.numel() // config.seq_len} windows of {config.seq_len}), "
          f"{train_tokens.numel()} training tokens; device {config.device}", flush=True)
    done_dir = Path(config.work_dir) / "done"
    for method in config.methods:
        marker = done_dir / _slug(method)
        if skip_done and marker.is_file():
            print(f"[quality] {method}: done in an earlier run ({marker}), skipped", flush=True)
            continue
        if run.out_of_time():
            print(f"[quality] out of time: {method} skipped", flush=True)
            continue
        skipped = run.skipped
        try:
            RUNNERS[method_of(method).builder](run, method)
        except Exception:  # one failed method must not cost the others' records
            if not keep_going:
                raise
            print(f"[quality] {method} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            continue
        if run.skipped == skipped:  # every size measured: mark it done
            atomic_write_text(marker, json.dumps({"method": method, "records": config.records_dir}))
    return run.records


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in method)


# -- command line -----------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.replace(",", " ").split() if x)


def fit_overrides(pairs: list[str], base: FitConfig) -> FitConfig:
    """``base`` with the ``--fit-set KEY=VALUE`` pairs set, each value read as the field's type
    (a tuple of sizes comma-separated; ``none`` for an optional whole number)."""
    changes = {}
    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--fit-set takes KEY=VALUE with KEY a FitConfig field, got {pair!r}")
        current = getattr(base, key)
        if isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif current is None or isinstance(current, int):
            changes[key] = None if value.lower() == "none" else int(value)
        elif isinstance(current, float):
            changes[key] = float(value)
        elif isinstance(current, tuple):  # sizes, comma-separated
            changes[key] = tuple(float(v) for v in value.split(",") if v)
        else:
            changes[key] = value
    return base.replace(**changes)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (every one documented)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="the LM: a .gguf file or a Hugging Face directory")
    p.add_argument("--eval-text", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"),
                   help="evaluation text (default: WikiText-2 raw test from ../shared)")
    p.add_argument("--train-text", default=str(SHARED / "data/wiki-summaries/wiki_summaries_en.txt"),
                   help="training and calibration text (default: the wiki summaries from ../shared)")
    p.add_argument("--methods", type=_names, default=DEFAULT_METHODS,
                   help=f"methods in the order they run, comma-separated; known: {', '.join(METHODS)}")
    p.add_argument("--sizes", type=_floats, default=PROTOCOL_SIZES, help=f"sizes (default: {listed(PROTOCOL_SIZES)})")
    p.add_argument("--ablation-sizes", type=_floats, default=None,
                   help="sizes of the ppn_bayes ablations (default: --sizes)")
    p.add_argument("--finetune-sizes", type=_floats, default=FINETUNE_SIZES,
                   help=f"sizes of the fine-tuned structured baselines, the +distill methods (default: "
                        f"{listed(FINETUNE_SIZES)})")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window (default: 2048)")
    p.add_argument("--limit-windows", type=int, default=None,
                   help="evaluate the first N windows only (a quick check: the records say quick)")
    p.add_argument("--eval-batch", type=int, default=8, help="windows per evaluation batch (default: 8)")
    p.add_argument("--calib-windows", type=int, default=None, help="calibration windows (default: 128)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default: 2048)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration draw (default: 0)")
    p.add_argument("--fit-steps", type=int, default=None, help=f"fit steps (default: {DEFAULT_FIT.steps})")
    p.add_argument("--fit-batch", type=int, default=None, help=f"fit batch (default: {DEFAULT_FIT.batch_size})")
    p.add_argument("--fit-seq-len", type=int, default=None,
                   help=f"fit window length (default: {DEFAULT_FIT.seq_len})")
    p.add_argument("--fit-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other FitConfig field, e.g. --fit-set lr_lm=5e-5 (repeatable)")
    p.add_argument("--freeze-fraction", type=float, default=None,
                   help="freeze the LM for this fraction of the fit steps (sets freeze_lm_steps)")
    p.add_argument("--autocast", choices=["bf16", "none"], default="bf16",
                   help="autocast of fits and fine-tunes on CUDA (evaluation is float32 always; default: bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available)")
    p.add_argument("--work-dir", default="runs/quality",
                   help="checkpoints, the model and token caches, pruned weights (default: runs/quality)")
    p.add_argument("--rankings", default=None,
                   help="JSON file the rankings are added to, for speed.py (default: WORK_DIR/rankings.json)")
    p.add_argument("--records-dir", default=str(RECORDS_DIR),
                   help=f"where quality.jsonl is appended to (default: {RECORDS_DIR})")
    p.add_argument("--model-name", default=None, help="model name in the records (default: from the file name)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new method or size is started")
    p.add_argument("--fit-time-budget", type=float, default=None,
                   help=f"seconds a fresh fit may take: a {PROBE_STEPS}-step probe measures the speed and the "
                        "fit gets as many of its steps as fit (the records give the tokens it saw)")
    p.add_argument("--save-sparse", default=None, metavar="METHOD@SIZE",
                   help="keep the pruned weights of one sparse baseline for speed.py, e.g. sparsegpt@0.5")
    p.add_argument("--fit-tokens", default=None,
                   help="token file or store (from `ppn-bayes teacher-text`): ppn_bayes-teacher fits on it alone; "
                        "ppn_bayes, its ablations and ppn_bayes-kd-prefix-mix on it and the training text, half "
                        "and half (several stores, comma-separated: the training text and each in equal shares)")
    p.add_argument("--fit-eval-windows", type=int, default=0,
                   help="hold the last N windows of the training text out of the fits and evaluate the deployed "
                        "masks at --fit-set eval_sizes on them every --fit-set eval_every steps (the fit's "
                        "diagnostics, written to WORK_DIR/fits/METHOD.validation.jsonl; default: 0, none)")
    p.add_argument("--fit-stop-after", type=float, default=None, metavar="SECONDS",
                   help="a fit stops after this long with a checkpoint and records nothing; the same command "
                        "again resumes it (for GPU time lent in stretches)")
    p.add_argument("--token-nll-dir", default=None, metavar="DIR",
                   help="also keep every evaluated token's NLL: DIR/METHOD@SIZE.safetensors (float16) and the "
                        "windows' targets, DIR/targets.safetensors; each record gets its mean NLL by context "
                        "length (nll_by_context). benchmarks/token_nll.py packs and analyses them")
    p.add_argument("--width-kd-sizes", type=_floats, default=WIDTH_KD_SIZES,
                   help=f"sizes of width-kd, one distillation each (default: {listed(WIDTH_KD_SIZES)})")
    p.add_argument("--width-kd-data", default=None,
                   help="what width-kd trains on: a .safetensors token file, a text (default: --train-text), or "
                        "token stores (comma-separated) mixed with the training text as the fit mixes --fit-tokens; "
                        "give it the fit's data")
    p.add_argument("--width-kd-tokens", type=float, default=None,
                   help="training tokens of each width-kd run, rounded down to whole steps of the fit's batch "
                        "(default: the fit's steps x batch x window); give it the fit's")
    p.add_argument("--width-mlp-group", type=int, default=32,
                   help="MLP channels per unit of the width cuts (default: 32; at 64 the cut under 0.5 keeps one "
                        "KV group of three)")
    p.add_argument("--width-kd-checkpoint-every", type=int, default=500,
                   help="width-kd checkpoints every this many steps, to resume after a time limit (default: 500)")
    p.add_argument("--width-kd-stop-after", type=float, default=None, metavar="SECONDS",
                   help="width-kd stops with a checkpoint at the first step after this many seconds from the start "
                        "of this run and records nothing; the same command again resumes it (for GPU time lent "
                        "in stretches)")
    p.add_argument("--quick", action="store_true",
                   help="a CPU smoke run: 2 windows, 2 fit steps of 1x128 tokens, 2 calibration windows of "
                        "128 tokens (explicit flags override)")
    p.add_argument("--prepare", action="store_true",
                   help="only convert and cache the model and the tokens under --work-dir, then exit")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing method")
    p.add_argument("--skip-done", action="store_true",
                   help="skip methods an earlier run with the same --work-dir finished (WORK_DIR/done/)")
    return p


def config_from(args: argparse.Namespace) -> QualityConfig:
    """A :class:`QualityConfig` from parsed flags."""
    quick = args.quick
    fit = QUICK_FIT if quick else DEFAULT_FIT
    fit = fit.replace(**{k: v for k, v in (("steps", args.fit_steps), ("batch_size", args.fit_batch),
                                           ("seq_len", args.fit_seq_len)) if v is not None})
    fit = fit_overrides(args.fit_set, fit)
    if args.freeze_fraction is not None:
        if not 0 <= args.freeze_fraction <= 1:
            raise SystemExit(f"--freeze-fraction must lie in [0, 1], got {args.freeze_fraction}")
        fit = fit.replace(freeze_lm_steps=int(args.freeze_fraction * fit.steps))
    limit = args.limit_windows if args.limit_windows is not None else (2 if quick else None)
    calib_windows = args.calib_windows if args.calib_windows is not None else (2 if quick else 128)
    calib_seq_len = args.calib_seq_len if args.calib_seq_len is not None else (128 if quick else 2048)
    return QualityConfig(
        model=args.model, eval_text=args.eval_text, train_text=args.train_text, methods=args.methods,
        sizes=args.sizes, ablation_sizes=args.ablation_sizes or args.sizes, finetune_sizes=args.finetune_sizes,
        seq_len=args.seq_len, limit_windows=limit, eval_batch=args.eval_batch, calib_windows=calib_windows,
        calib_seq_len=calib_seq_len, calib_seed=args.calib_seed, fit=fit, autocast=args.autocast,
        device=args.device, work_dir=args.work_dir,
        rankings=args.rankings or str(Path(args.work_dir) / "rankings.json"), records_dir=args.records_dir,
        model_name=args.model_name, time_budget=args.time_budget, fit_time_budget=args.fit_time_budget, quick=quick, save_sparse=args.save_sparse,
        fit_tokens=args.fit_tokens, width_kd_sizes=args.width_kd_sizes, width_kd_data=args.width_kd_data,
        fit_eval_windows=args.fit_eval_windows, fit_stop_after=args.fit_stop_after,
        token_nll_dir=args.token_nll_dir,
        width_kd_tokens=None if args.width_kd_tokens is None else int(args.width_kd_tokens),
        width_mlp_group=args.width_mlp_group, width_kd_checkpoint_every=args.width_kd_checkpoint_every,
        width_kd_stop_after=args.width_kd_stop_after,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse flags, build the configuration, run."""
    args = build_parser().parse_args(argv)
    config = config_from(args)
    if args.prepare:
        load_inputs(config)
        print(f"[quality] cached the model and tokens under {config.work_dir}")
        return 0
    records = run_quality(config, keep_going=not args.stop_on_error, skip_done=args.skip_done)
    print(f"[quality] {len(records)} records appended to {Path(config.records_dir) / 'quality.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
