"""benchmarks/report.py on synthetic records; quality.py and speed.py end to end on a tiny LM."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import warnings
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from ppn_bayes.data import CharTokenizer, TokenBlocks, embedded_text
from ppn_bayes.lm import save_lm, tiny_llama
from ppn_bayes.records import append_record, read_records
from ppn_bayes.train import load_fit

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = _load("report")


def _quality(records_dir, method, size, ppl, reached=None, *, quick=False, date=None, command="cmd-q"):
    record = append_record("quality", method=method, model="M", records_dir=records_dir, command=command,
                           size_requested=size, size_reached=reached if reached is not None else size - 0.002,
                           ppl=ppl, windows=2 if quick else 147, seq_len=2048, train_tokens=0, quick=quick,
                           machine="h200: NVIDIA H200")
    return _dated(records_dir, "quality", record, date)


def _dated(records_dir, benchmark, record, date):
    """``record``, the last line of ``benchmark``'s file, rewritten with a chosen ``date`` (None: as written)."""
    if date is not None:
        path = Path(records_dir) / f"{benchmark}.jsonl"
        lines = path.read_text().splitlines()
        record["date"] = date
        lines[-1] = json.dumps(record)
        path.write_text("\n".join(lines) + "\n")
    return record


def _speed(records_dir, method, size, rate, ratio, phase="decode", machine="h200: NVIDIA H200", new_tokens=256,
           date=None, command="cmd-s"):
    record = append_record("speed", method=method, model="M", records_dir=records_dir, command=command,
                           size_requested=size, size_reached=size - 0.01, tokens_per_s=rate, ratio_vs_dense=ratio,
                           phase=phase, batch=1, seq_len=32, new_tokens=new_tokens, dtype="bfloat16", compiled=True,
                           quick=False, machine=machine)
    return _dated(records_dir, "speed", record, date)


def test_speed_rows_of_another_measurement_shape_get_their_own_table(tmp_path):
    """A later run that decodes 256 tokens supersedes the rows it measured, not a row of a run that
    decoded 64: each shape has its own table, headed by that shape."""
    rec = tmp_path / "records"
    week_before, now = "2026-11-28T22:57:00+00:00", "2026-12-05T08:00:00+00:00"  # the 64-token run a week before
    _speed(rec, "dense", 1.0, 10.0, 1.0, machine="cpu: x86_64", new_tokens=64, date=week_before)
    _speed(rec, "magnitude-zeros", 0.5, 11.0, 1.1, machine="cpu: x86_64", new_tokens=64, date=week_before)
    _speed(rec, "dense", 1.0, 17.0, 1.0, machine="cpu: x86_64", new_tokens=256, date=now)
    _speed(rec, "ppn_bayes", 0.5, 25.0, 1.47, machine="cpu: x86_64", new_tokens=256, date=now)
    out = tmp_path / "benchmarks.md"
    report.main(["--records-dir", str(rec), "--out", str(out)])
    text = out.read_text()
    tables = text.split("### Protocol runs: decode on cpu")[1:]
    assert len(tables) == 2 and "256 new tokens" in tables[0].split("\n")[0]  # the latest measurement first
    assert text.count("](benchmarks/speed-cpu-decode.png)") == 1 and "speed-cpu-decode.png" in tables[0]
    by_tokens = {("256 new tokens" in t.split("\n")[0]): t.split("Produced by")[0] for t in tables}
    assert "| magnitude-zeros | 0.5 |" in by_tokens[False] and "| 10 | 1 |" in by_tokens[False]
    assert "| ppn_bayes | 0.5 |" not in by_tokens[False]
    assert "| ppn_bayes | 0.5 |" in by_tokens[True] and "| 17 | 1 |" in by_tokens[True]
    assert "magnitude-zeros" not in by_tokens[True]


def test_speed_rows_of_another_ranking_get_their_own_table(tmp_path):
    """A later run of the same shape that cuts its sub-networks by another rankings file does not
    leave the older ranking's rows in its table: the older run keeps a table of its own (not
    plotted), and two runs of one rankings file share one table."""
    rec = tmp_path / "records"
    old, new = "2026-11-28T22:57:00+00:00", "2026-12-05T13:30:00+00:00"
    old_cmd = "python3 benchmarks/speed.py --rankings /root/ppn-work/rankings.json --sizes 0.5,0.3"
    new_cmd = "python3 benchmarks/speed.py --rankings docs/benchmarks/rankings/seed0-hold1000.json"
    _speed(rec, "dense", 1.0, 700.0, 1.0, date=old, command=old_cmd)
    _speed(rec, "ppn_bayes", 0.5, 900.0, 1.28, date=old, command=old_cmd)
    _speed(rec, "ppn_bayes", 0.3, 1178.0, 1.67, date=old, command=old_cmd)
    _speed(rec, "dense", 1.0, 750.0, 1.0, date=new, command=new_cmd)
    _speed(rec, "ppn_bayes", 0.5, 786.0, 1.05, date=new, command=new_cmd)
    _speed(rec, "ppn_bayes", 0.3, 911.0, 1.22, date=new, command=new_cmd + " --sizes 0.3")  # a second run
    out = tmp_path / "benchmarks.md"
    report.main(["--records-dir", str(rec), "--out", str(out)])
    tables = out.read_text().split("### Protocol runs: decode on h200")[1:]
    assert len(tables) == 2
    latest, older = (t.split("Produced by")[0] for t in tables)
    assert "sub-networks of `docs/benchmarks/rankings/seed0-hold1000.json`" in latest.split("\n")[0]
    assert "| ppn_bayes | 0.3 | 0.29 | 911 | 1.22 |" in latest and "1,178" not in latest
    assert "| ppn_bayes | 0.3 | 0.29 | 1,178 | 1.67 |" in older and "`/root/ppn-work/rankings.json`" in older
    assert "speed-h200-decode.png" in tables[0] and "speed-h200-decode.png" not in tables[1]


def test_report_with_no_records_says_not_yet_measured(tmp_path):
    out = tmp_path / "docs" / "benchmarks.md"
    assert report.main(["--records-dir", str(tmp_path / "none"), "--out", str(out)]) == 0
    text = out.read_text()
    # quality, speed, recipes, speculative, resize, fit, teacher, token_nll, settle
    assert text.count("Not yet measured") == 9
    assert "GENERATED by `python benchmarks/report.py`" in text


def test_report_tables_targets_and_plots(tmp_path):
    rec = tmp_path / "records"
    _quality(rec, "dense", 1.0, 20.0, 1.0)
    ppn = {0.9: 21.0, 0.7: 22.5, 0.5: 25.0, 0.4: 31.0, 0.3: 60.0}
    for size, ppl in ppn.items():
        _quality(rec, "ppn_bayes", size, ppl)
    _quality(rec, "ppn_bayes", 0.5, 99.0, date="2000-01-01T00:00:00+00:00")  # older: superseded
    for size, (sgpt, wanda) in {0.5: (30.0, 33.0), 0.4: (45.0, 50.0), 0.3: (50.0, 140.0)}.items():
        _quality(rec, "sparsegpt", size, sgpt)
        _quality(rec, "wanda", size, wanda)
    _quality(rec, "magnitude", 0.5, 1234.5, quick=True, command="cmd-quick")
    _speed(rec, "dense", 1.0, 500.0, 1.0)
    _speed(rec, "ppn_bayes", 0.5, 1000.0, 2.0)
    _speed(rec, "ppn_bayes", 0.3, 1200.0, 2.4)
    append_record("fit", method="ppn_bayes", model="M", records_dir=rec, command="cmd-f",
                  tokens_per_s=1234.0, parallel="none", settings={"x": 1}, machine="h200: NVIDIA H200")
    out = tmp_path / "docs" / "benchmarks.md"
    report.main(["--records-dir", str(rec), "--out", str(out)])
    text = out.read_text()

    # the latest record counts; cells give perplexity (size reached)
    assert "| ppn_bayes | – | 21 (0.898) | 22.5 (0.698) | 25 (0.498) | 31 (0.398) | 60 (0.298) | 147 | 0 |" in text
    assert "99" not in text.split("Run-to-run spread")[0]
    # the superseded run is in the spread of the runs with the same settings, with its size only
    spread = text.split("Run-to-run spread")[1].split("Targets")[0]
    assert "| method | training text | training tokens | 0.5 |" in spread
    assert re.search(r"\| ppn_bayes \| [^|]+ \| 0 \| 25 to 99 \(2\) \|", spread)
    # targets: 25 < 30 and 33; 31 < 45 and 50; 60 > 50 (missed by ratio 1.20), 60 < 140; 25/20 = 1.25 <= 1.3
    assert "| ppn_bayes below SparseGPT, unstructured at 0.3 | 60 (1 run) vs 50 | missed (ratio 1.20) |" in text
    assert "| ppn_bayes below Wanda, unstructured at 0.3 | 60 (1 run) vs 140 | met (ratio 0.43) |" in text
    target_table = text.split("Targets (from the issue):")[1].split("![")[0]
    assert target_table.count("| met (") == 6 and target_table.count("| missed (") == 1
    assert "| ppn_bayes within 1.3 x dense at 0.5 | 25 vs 20 | met (1.25 x dense) |" in text
    # quick records: their own table, never in the protocol one
    quick = text.split("### Quick checks (a subset of the windows: not the protocol)")[1].split("## Speed")[0]
    assert "1,234" in quick and "cmd-quick" in quick and "magnitude" not in text.split("### Quick")[0]
    # speed: 2.0 at 0.49 against a target of 0.9/0.49 = 1.84 -> met; 2.4 at 0.29 vs 3.10 -> missed
    assert "| ppn_bayes | 0.5 | 0.49 | 1,000 | 2 | 1.837 | met (1.09 of target) |" in text
    assert "| ppn_bayes | 0.3 | 0.29 | 1,200 | 2.4 | 3.103 | missed (0.77 of target) |" in text
    # the other benchmarks: a generic table; provenance of every table
    assert "## Fit cost" in text and "| ppn_bayes | 1,234 | none |" in text
    assert "Not yet measured (no `speculative.jsonl`)." in text and "Not yet measured (no `resize.jsonl`)." in text
    for command in ("cmd-q", "cmd-s", "cmd-f"):
        assert f"`{command}`" in text
    images = sorted(p.name for p in (tmp_path / "docs" / "benchmarks").iterdir())
    assert images == ["quality-M.png", "speed-h200-decode.png"]
    for name in images:
        assert (tmp_path / "docs" / "benchmarks" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](benchmarks/{name})" in text


# -- the benchmarks end to end on a tiny LM ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    text = embedded_text()[:60_000]
    (root / "text.txt").write_text(text)
    tokenizer = CharTokenizer.for_text(text)
    save_lm(tiny_llama(tokenizer.vocab_size, layers=3, hidden=32, heads=4, kv_heads=2, intermediate=128),
            tokenizer, root / "lm")
    return root


def _tiny_quality_args(root: Path, records: Path, *extra: str) -> list[str]:
    return ["--model", str(root / "lm"), "--eval-text", str(root / "text.txt"), "--train-text",
            str(root / "text.txt"), "--sizes", "0.7,0.5", "--seq-len", "64", "--limit-windows", "2",
            "--eval-batch", "2", "--fit-steps", "2", "--fit-batch", "2", "--fit-seq-len", "32",
            "--fit-set", "mlp_group=32", "--calib-windows", "2", "--calib-seq-len", "32", "--device", "cpu",
            "--work-dir", str(root / "work"), "--records-dir", str(records), *extra]


def test_scaling_pairs_take_the_one_process_run_of_the_same_launch():
    """A strong two-process run is compared with the one-process run its launch reused,
    even where that run was recorded as the weak-scaling baseline of the same batch."""
    def run(processes, scaling, date, tokens, loss, global_batch=48):
        return {"benchmark": "fit", "scaling": scaling, "processes": processes, "parallel": "ddp" if processes > 1
                else "none", "batch_per_gpu": global_batch // processes if scaling == "strong" else 48,
                "global_batch": global_batch, "seq_len": 1024, "dtype": "bf16", "steps": 20, "device": "cuda",
                "date": date, "tokens_per_s": tokens, "loss": loss, "machine": "h200: NVIDIA H200 x2"}

    older = run(1, "strong", "2026-11-28T10:00", 45_000.0, [3.0, 2.0])
    baseline = run(1, "weak", "2026-11-29T04:54", 46_000.0, [3.0, 2.5])
    strong = run(2, "strong", "2026-11-29T04:56", 81_000.0, [3.0, 2.4])
    later = run(1, "weak", "2026-11-30T00:00", 47_000.0, [9.0, 9.0])  # after the two-process run: not its own
    pairs = report._scaling_pairs([older, baseline, strong, later])
    assert pairs == [("strong", baseline, strong, baseline["loss"])]


def test_quality_and_speed_end_to_end(tiny_setup, tmp_path):
    quality, speed = _load("quality"), _load("speed")
    records = tmp_path / "records"
    rankings = tmp_path / "rankings.json"
    quality.main(_tiny_quality_args(tiny_setup, records, "--methods", "dense,ppn_bayes,shortgpt,magnitude",
                                    "--rankings", str(rankings), "--model-name", "tiny"))
    rows = read_records("quality", records)
    assert [(r["method"], r["size_requested"]) for r in rows] == [
        ("dense", 1.0), ("ppn_bayes", 0.7), ("ppn_bayes", 0.5), ("shortgpt", 0.7), ("shortgpt", 0.5),
        ("magnitude", 0.7), ("magnitude", 0.5)]
    for r in rows:
        assert r["model"] == "tiny" and r["quick"] is True and r["windows"] == 2 and r["seq_len"] == 64
        assert r["size_reached"] <= r["size_requested"] and r["ppl"] > 1
        assert r["settings"]["eval_dtype"] == "float32"
    fitted = [r for r in rows if r["method"] == "ppn_bayes"]
    assert all(r["train_tokens"] == 2 * 2 * 32 and r["settings"]["fit"]["steps"] == 2 for r in fitted)
    # the record recipe's step: size_min and three random sizes, no row for the full LM
    assert all(r["settings"]["sizes_per_step"] == 4 for r in fitted)
    assert all(r["train_tokens"] == 0 and r["settings"]["training"] == "none"
               for r in rows if r["method"] in ("shortgpt", "magnitude"))
    saved = json.loads(rankings.read_text())
    assert set(saved["rankings"]) == {"ppn_bayes", "shortgpt", "magnitude"}

    # a second run reuses the finished fit (same ranking, so the same sub-networks)
    again = tmp_path / "again"
    quality.main(_tiny_quality_args(tiny_setup, again, "--methods", "ppn_bayes", "--rankings", str(rankings)))
    assert [r["ppl"] for r in read_records("quality", again)] == [r["ppl"] for r in fitted]

    speed.main(["--model", str(tiny_setup / "lm"), "--rankings", str(rankings), "--sizes", "0.7,0.5",
                "--device", "cpu", "--quick", "--records-dir", str(records), "--prompt-text",
                str(tiny_setup / "text.txt"), "--sparse-zeros", "0.5", "--model-name", "tiny"])
    rows = read_records("speed", records)
    assert [(r["phase"], r["method"], r["size_requested"]) for r in rows] == [
        (phase, method, size) for method, size in
        (("dense", 1.0), ("ppn_bayes", 0.7), ("ppn_bayes", 0.5), ("magnitude-zeros", 0.5))
        for phase in ("prefill", "decode")]
    by = {(r["phase"], r["method"], r["size_requested"]): r for r in rows}
    for r in rows:
        dense = by[(r["phase"], "dense", 1.0)]
        assert r["ratio_vs_dense"] == pytest.approx(r["tokens_per_s"] / dense["tokens_per_s"])
        assert r["quick"] is True and r["dtype"] == "float32" and r["compiled"] is False
    ppn = {r["size_requested"]: r for r in fitted}
    assert by[("decode", "ppn_bayes", 0.5)]["size_reached"] == pytest.approx(ppn[0.5]["size_reached"])
    assert by[("decode", "magnitude-zeros", 0.5)]["size_reached"] == pytest.approx(0.5, abs=0.02)


def test_a_fit_with_size_adapters_is_scored_on_each_sizes_merged_weights(tiny_setup, tmp_path):
    """quality.py cuts an adapter fit's sub-networks through ``PuppetFit.subnetwork_of`` (merged in
    place, undone to the bit): each record is the perplexity of the slow reference, the masks cut
    from the copy ``lm_at(size)`` makes, scored by the same Run in the same precision."""
    from ppn_bayes.deploy.subnetwork import build_subnetwork

    quality = _load("quality")
    records, work = tmp_path / "records", tmp_path / "work"
    args = [*_tiny_quality_args(tiny_setup, records, "--methods", "ppn_bayes", "--fit-set", "size_rank=2",
                                "--fit-set", "lr_lm=0.05"), "--work-dir", str(work)]
    quality.main(args)
    rows = read_records("quality", records)
    assert [r["size_requested"] for r in rows] == [0.7, 0.5]
    config = quality.config_from(quality.build_parser().parse_args(args))
    run = quality.Run(config, *quality.load_inputs(config))
    fitted = load_fit(work / "fits" / "ppn_bayes")
    fitted.lm.float().eval()
    assert fitted.adapters is not None
    ranking = fitted.ranking()
    for r in rows:
        masks = ranking.masks(r["size_requested"])
        reference = run.evaluate(build_subnetwork(fitted.lm_at(r["size_requested"]), masks))
        assert r["ppl"] == reference.ppl
    # the adapters moved: the sizes' own weights are not the plain LM's
    masks = ranking.masks(0.5)
    assert run.evaluate(build_subnetwork(fitted.lm, masks)).ppl != rows[1]["ppl"]


def test_a_fit_variant_then_a_fine_tune_of_its_chosen_size(tiny_setup, tmp_path):
    """ppn_bayes-original+distill fits ppn_bayes-original first (teacher='original'),
    records its sizes, then fine-tunes its sub-network at the chosen size."""
    quality = _load("quality")
    records = tmp_path / "records"
    quality.main(_tiny_quality_args(tiny_setup, records, "--methods", "ppn_bayes-original+distill",
                                    "--finetune-sizes", "0.5"))
    rows = read_records("quality", records)
    assert [(r["method"], r["size_requested"]) for r in rows] == [
        ("ppn_bayes-original", 0.7), ("ppn_bayes-original", 0.5), ("ppn_bayes-original+distill", 0.5)]
    assert all(r["settings"]["fit"]["teacher"] == "original" for r in rows)
    tuned = rows[-1]
    assert tuned["train_tokens"] == 2 * rows[0]["train_tokens"] == 2 * 2 * 2 * 32
    assert tuned["settings"]["training"].startswith("the ppn_bayes-original fit, then")
    assert tuned["settings"]["checkpoint"].endswith("ppn_bayes-original")
    # four times the fine-tune from the same fit (reused, not fitted again)
    quality.main(_tiny_quality_args(tiny_setup, records, "--methods", "ppn_bayes-original+distill-long",
                                    "--finetune-sizes", "0.5"))
    longer = read_records("quality", records)[3:]
    assert [(r["method"], r["size_requested"]) for r in longer] == [("ppn_bayes-original+distill-long", 0.5)]
    assert longer[0]["settings"]["finetune_tokens"] == 4 * rows[0]["train_tokens"]
    assert longer[0]["train_tokens"] == 5 * rows[0]["train_tokens"]


def test_time_boxed_fit_settles_its_steps_once(tiny_setup, tmp_path):
    quality = _load("quality")
    args = _tiny_quality_args(tiny_setup, tmp_path / "r", "--methods", "ppn_bayes", "--sizes", "0.5",
                              "--work-dir", str(tmp_path / "work"), "--fit-steps", "40")
    quality.main([*args, "--fit-time-budget", "0.001"])  # a probe of 10 steps, and no time for more
    first = read_records("quality", tmp_path / "r")
    assert [r["settings"]["fit"]["steps"] for r in first] == [quality.PROBE_STEPS]
    assert first[0]["train_tokens"] == quality.PROBE_STEPS * 2 * 32
    quality.main([*args, "--fit-time-budget", "1000"])  # a rerun keeps the settled steps: no more training
    again = read_records("quality", tmp_path / "r")
    assert again[1]["settings"]["fit"]["steps"] == quality.PROBE_STEPS and again[1]["ppl"] == first[0]["ppl"]
    assert again[1]["settings"]["fit_seconds"] is None  # the finished fit was reused


def test_speed_refuses_a_ranking_of_another_model(tiny_setup, tmp_path):
    speed = _load("speed")
    quality = _load("quality")
    rankings = tmp_path / "rankings.json"
    quality.main(_tiny_quality_args(tiny_setup, tmp_path / "r", "--methods", "magnitude", "--rankings", str(rankings)))
    other = tmp_path / "other"
    tokenizer = CharTokenizer.for_text(embedded_text()[:60_000])
    save_lm(tiny_llama(tokenizer.vocab_size, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=128),
            tokenizer, other)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(other)
    with pytest.raises(ValueError, match="another model"):
        speed.load_ranking(rankings, "magnitude", lm)
    with pytest.raises(ValueError, match="no ranking for 'ppn_bayes'"):
        speed.load_ranking(rankings, "ppn_bayes", lm)


def test_quality_rejects_unknown_methods_and_bad_fit_settings(tiny_setup, tmp_path):
    quality = _load("quality")
    with pytest.raises(ValueError, match="unknown methods"):
        quality.main(_tiny_quality_args(tiny_setup, tmp_path, "--methods", "dense,obs"))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        quality.main(_tiny_quality_args(tiny_setup, tmp_path, "--fit-set", "nonsense=1"))


@pytest.mark.slow
def test_issue_15_parts_rehearsal_on_cpu(tiny_setup, tmp_path):
    """gpu_job.sh part9 and part10 with FREE_TEXT=1 on a tiny LM (both teacher texts written,
    the fit and width-kd on the summaries and both, a third each), gen-out, and the same parts
    on a fresh work folder from the carried stores (GEN_STORE, GEN_FREE_STORE): the same data,
    the same width-kd (minutes: slow)."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("wiki.test.raw", "wiki_summaries_en.txt"):
        (texts / name).write_text((tiny_setup / "text.txt").read_text())
    env = {**os.environ, "OUT": str(tmp_path / "out"), "MODEL": str(tiny_setup / "lm"), "TEXTS": str(texts),
           "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "MODEL_NAME": "tiny", "LIMIT": "900",
           "QUALITY_EXTRA": "--seq-len 64 --limit-windows 2 --eval-batch 2 --fit-set mlp_group=32 "
                            "--calib-windows 2 --calib-seq-len 32 --fit-seq-len 64",
           "RECORD_STEPS": "2", "GEN_TOKENS": "2000", "GEN_BATCH": "2", "FREE_TEXT": "1", "WIDTH_KD_SIZES": "0.5",
           "WIDTH_KD_COMPILE": "none"}

    def job(*args, **extra):
        subprocess.run(["bash", "benchmarks/gpu_job.sh", *args], cwd=ROOT, env={**env, **extra}, check=True,
                       timeout=900)

    job("part9")
    job("part10")
    job("gen-out")
    job("gen-out", "gen-free")
    fit, *_, kd = [r for r in read_records("quality", tmp_path / "out" / "records")
                   if r["method"] in ("ppn_bayes", "width-kd")]
    assert fit["settings"]["train_text"] == kd["settings"]["data"] == "wiki_summaries_en.txt + gen + gen-free, 1/3 each"
    assert fit["settings"]["fit_data"] == kd["settings"]["fit_data"]
    carried = tmp_path / "carried"
    shutil.copytree(tmp_path / "out" / "gen", carried / "gen")
    shutil.copytree(tmp_path / "out" / "gen-free", carried / "gen-free")
    job("part10", OUT=str(tmp_path / "out2"), WORK=str(tmp_path / "work2"), GEN_STORE=str(carried / "gen"),
        GEN_FREE_STORE=str(carried / "gen-free"))
    again = [r for r in read_records("quality", tmp_path / "out2" / "records") if r["method"] == "width-kd"][-1]
    sha = [[source["sha256"] for source in r["settings"]["fit_data"]["sources"]] for r in (again, kd)]
    assert sha[0] == sha[1] and again["ppl"] == kd["ppl"]
    log = (tmp_path / "out2" / "gen.log").read_text()
    assert log.count("tokens from") == 2 and '"rounds"' not in log  # both carried in, nothing generated
    # the texts alone, on a fresh work folder: the same store, and no fit
    job("gen", OUT=str(tmp_path / "out3"), WORK=str(tmp_path / "work3"))
    job("gen-out", OUT=str(tmp_path / "out3"), WORK=str(tmp_path / "work3"))
    written = sorted((tmp_path / "out3" / "gen").iterdir())
    assert [f.name for f in written] == sorted(f.name for f in (tmp_path / "out" / "gen").iterdir())
    assert all(f.read_bytes() == (tmp_path / "out" / "gen" / f.name).read_bytes() for f in written)
    assert not (tmp_path / "out3" / "records").exists() or not read_records("quality", tmp_path / "out3" / "records")


@pytest.mark.slow
def test_issue_15_diagnostic_parts_rehearsal_on_cpu(tiny_setup, tmp_path):
    """gpu_job.sh part12 (baselines with every token's NLL kept), part9 and part13 (width-kd at
    two rates) with TOKEN_NLL=1, and nll-out on a tiny LM: one packed file a folder, base's
    beside each, that benchmarks/token_nll.py analyses, one width-kd record per rate; cache-out, and the cache
    restored on a fresh work folder (minutes: slow)."""
    token_nll = _load("token_nll")
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("wiki.test.raw", "wiki_summaries_en.txt"):
        (texts / name).write_text((tiny_setup / "text.txt").read_text())
    inherited = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # torch sets it once used
    env = {**inherited, "OUT": str(tmp_path / "out"), "MODEL": str(tiny_setup / "lm"), "TEXTS": str(texts),
           "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "MODEL_NAME": "tiny", "LIMIT": "900",
           "QUALITY_EXTRA": "--seq-len 64 --limit-windows 2 --eval-batch 2 --fit-set mlp_group=32 "
                            "--calib-windows 2 --calib-seq-len 32 --fit-seq-len 64",
           "RECORD_STEPS": "2", "GEN_TOKENS": "2000", "GEN_BATCH": "2", "TOKEN_NLL": "1",
           "BASE_METHODS": "dense,magnitude", "WKD_LRS": "1e-4,3e-4", "WKD_STEPS": "2", "WKD_SEQ": "64"}
    folders = ["seed0", "wkd12-lr1e-4-b0.999", "wkd12-lr3e-4-b0.999"]  # two width-kd@0.5: one file each
    for part in (["part12"], ["part9"], ["part13"], ["nll-out", *folders]):
        subprocess.run(["bash", "benchmarks/gpu_job.sh", *part], cwd=ROOT, env=env, check=True, timeout=900)
    tokenizer = CharTokenizer.from_pretrained(tiny_setup / "lm")
    networks = {f: {s["network"] for s in token_nll.analyse(tmp_path / "out" / f"token-nll-{f}.safetensors",
                                                            tokenizer)} for f in folders}
    assert networks == {"seed0": {"magnitude@0.5", *(f"ppn_bayes@{s:g}" for s in (0.9, 0.7, 0.5, 0.4, 0.3))},
                        "wkd12-lr1e-4-b0.999": {"magnitude@0.5", "width-kd@0.5"},
                        "wkd12-lr3e-4-b0.999": {"magnitude@0.5", "width-kd@0.5"}}  # each against base's dense LM
    kd = [r for r in read_records("quality", tmp_path / "out" / "records") if r["method"] == "width-kd"]
    assert sorted(r["settings"]["distill"]["lr"] for r in kd) == [1e-4, 3e-4]
    assert {r["train_tokens"] for r in kd} == {2 * 16 * 64}
    # the compile cache (width-kd compiled with inductor) goes out in parts and comes back whole on a fresh work
    # folder, before anything compiles there
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "cache-out"], cwd=ROOT, env=env, check=True, timeout=300)
    parts = tmp_path / "out" / "inductor-cache"
    assert sorted(p.name for p in parts.iterdir())[0] == "part-00"
    fresh = {**env, "WORK": str(tmp_path / "work2"), "OUT": str(tmp_path / "out2"), "COMPILE_CACHE": str(parts),
             "BASE_METHODS": "dense"}
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "part12"], cwd=ROOT, env=fresh, check=True, timeout=900)

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")

    cache = files(tmp_path / "work" / "inductor-cache")
    assert cache and set(cache) <= set(files(tmp_path / "work2" / "inductor-cache"))


def _part14_env(tiny_setup, tmp_path, **extra) -> dict:
    """The environment of a CPU rehearsal of gpu_job.sh part14 on the tiny LM: its text as both
    texts, two fit steps, short windows, a small teacher text; ``extra`` on top."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("wiki.test.raw", "wiki_summaries_en.txt"):
        (texts / name).write_text((tiny_setup / "text.txt").read_text())
    inherited = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # torch sets it once used
    return {**inherited, "OUT": str(tmp_path / "out"), "MODEL": str(tiny_setup / "lm"), "TEXTS": str(texts),
            "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "MODEL_NAME": "tiny", "LIMIT": "900",
            "QUALITY_EXTRA": "--seq-len 64 --limit-windows 2 --eval-batch 2 --fit-set mlp_group=32 "
                             "--calib-windows 2 --calib-seq-len 32 --fit-seq-len 64",
            "RECORD_STEPS": "2", "GEN_TOKENS": "2000", "GEN_BATCH": "2", **extra}


@pytest.mark.slow
def test_issue_15_bar_runs_one_a_gpu_rehearsal_on_cpu(tiny_setup, tmp_path):
    """gpu_job.sh part14 on a tiny LM with GPUS=2: the first two JOBS, the fit of record's seed 1
    and width-kd at 0.5, run at once, each in its own folder and log (one machine "GPU", no
    nvidia-smi: both on GPU 0), width-kd on the fit's text and tokens; the third job, seed 0, waits
    in the first one's slot and runs after it. With too little of LIMIT left no job starts: each
    is left for a later call (minutes: slow)."""
    env = _part14_env(tiny_setup, tmp_path, GPUS="2", WIDTH_KD_COMPILE="none")
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "part14"], cwd=ROOT,
                   env={**env, "JOBS": "fit:1 wkd:0.5 fit:0"}, check=True, timeout=900)
    records = read_records("quality", tmp_path / "out" / "records")
    fits = [r for r in records if r["method"] == "ppn_bayes"]
    kd = [r for r in records if r["method"] == "width-kd"]
    assert sorted(r["size_requested"] for r in fits) == sorted([0.3, 0.4, 0.5, 0.7, 0.9] * 2)
    assert [r["settings"]["fit"]["seed"] for r in fits] == [1] * 5 + [0] * 5  # seed 0 after seed 1
    assert [r["size_requested"] for r in kd] == [0.5]
    assert kd[0]["train_tokens"] == fits[0]["train_tokens"] == 2 * 16 * 64
    # the same text: the summaries less the fit's held-out windows, mixed with the same store
    assert kd[0]["settings"]["fit_data"] == fits[0]["settings"]["fit_data"]
    logs = ["gpu0-job0.log", "gpu0-job1.log", "gpu0-job2.log"]
    assert sorted(p.name for p in (tmp_path / "out").glob("gpu*-job*.log")) == logs
    assert all((tmp_path / "work" / f).is_dir() for f in ("seed1", "wkd-0.5", "seed0"))
    # no job starts with no more than QUEUE_MIN seconds of LIMIT left: each waits for a later call
    late = subprocess.run(["bash", "benchmarks/gpu_job.sh", "part14"], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "JOBS": "fit:1 wkd:0.3", "GPUS": "1", "QUEUE_MIN": "100000"},
                          check=True, timeout=900)
    assert "wkd:0.3" not in late.stdout and not (tmp_path / "work" / "wkd-0.3").exists()
    assert "for a later call" in (tmp_path / "out" / "gpu0-job0.log").read_text()


@pytest.mark.slow
def test_issue_15_ablation_jobs_rehearsal_on_cpu(tiny_setup, tmp_path):
    """gpu_job.sh part14 with fit:SEED:METHOD jobs on a tiny LM: the shorter reference fit and
    the ablations side by side, each in its own folder (the start held, hold_steps = its
    every step, and one size alone among them); the fits share every setting
    but the ablation's own changes (the recipe, the seed, the text and the tokens) (minutes:
    slow; test_jobs checks that a method quality.py does not fit is refused)."""
    fit_changes = _load("protocol").fit_changes
    env = _part14_env(tiny_setup, tmp_path, GPUS="5", RECORD_EXTRA="--fit-set compile=none --fit-set warmup_steps=1",
                      WKD_EXTRA="--fit-set warmup_steps=1", WIDTH_KD_COMPILE="none")
    methods = ("ppn_bayes-short", "ppn_bayes-flat", "ppn_bayes-point", "ppn_bayes-start", "ppn_bayes-alone")
    # FitConfig fields of one job, a list among them: its folder reads '_' for the list's commas
    settled = "fit:0:ppn_bayes-short:settle_steps=1/average_steps=1/train_sizes=0.5,0.7"
    changes = ("settle_steps", "average_steps", "train_sizes")
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "part14"], cwd=ROOT, check=True, timeout=900,
                   env={**env, "JOBS": " ".join([*(f"fit:0:{m}" for m in methods), settled, "wkd:0.5:width-kd-short"])})
    records = read_records("quality", tmp_path / "out" / "records")
    # the short fits' peer: width-kd recorded apart, on their text and tokens, with WKD_EXTRA's warm-up
    kd = [r for r in records if r["method"] == "width-kd-short"]
    records = [r for r in records if r not in kd]
    assert [r["size_requested"] for r in kd] == [0.5]
    assert (tmp_path / "work" / "wkd-0.5-width-kd-short" / "width-kd-short" / "0.5" / "done.json").is_file()
    assert kd[0]["settings"]["distill"]["warmup_steps"] == 1
    assert kd[0]["train_tokens"] == records[0]["train_tokens"] == 2 * 16 * 64
    assert kd[0]["settings"]["fit_data"] == records[0]["settings"]["fit_data"]
    settled_folder = "seed0-ppn_bayes-short-settle_steps1-average_steps1-train_sizes0.5_0.7"
    assert (tmp_path / "work" / settled_folder).is_dir()
    # each fit's evaluations and ranking come back in one file
    folders = [f"seed0-{m}" for m in methods] + [settled_folder]
    with tarfile.open(tmp_path / "out" / "fits.tar") as tar:
        assert sorted(n for n in tar.getnames() if n.endswith((".json", ".jsonl"))) == sorted(
            f"./{f}/{name}" for f in folders for name in ("rankings.json", "validation.jsonl"))
        rows = [json.loads(line) for line in tar.extractfile(f"./{folders[0]}/validation.jsonl").read().splitlines()]
    assert rows[-1]["step"] == 2
    assert not list((tmp_path / "out").glob("validation-*")) and not list((tmp_path / "out").glob("rankings-*"))
    settles = [r for r in records if r["settings"]["fit"]["settle_steps"]]
    assert sorted(r["size_requested"] for r in settles) == [0.3, 0.4, 0.5, 0.7, 0.9]
    short = next(r["settings"]["fit"] for r in records if r["method"] == "ppn_bayes-short" and r not in settles)
    assert {k: v for k, v in settles[0]["settings"]["fit"].items() if k not in changes} \
        == {k: v for k, v in short.items() if k not in changes}
    assert [settles[0]["settings"]["fit"][k] for k in changes] == [1, 1, [0.5, 0.7]]
    assert [short[k] for k in changes] == [0, 0, []]
    records = [r for r in records if r not in settles]
    assert sorted({r["method"] for r in records}) == sorted(methods)
    assert all(sorted(r["size_requested"] for r in records if r["method"] == m) == [0.3, 0.4, 0.5, 0.7, 0.9]
               for m in methods)
    assert all((tmp_path / "work" / f"seed0-{m}").is_dir() for m in methods)
    fits = {r["method"]: r["settings"]["fit"] for r in records}
    changed = {m: set(fit_changes(m)) for m in methods}
    for m in methods[1:]:
        assert changed[m]  # an ablation changes something
        assert {k: v for k, v in fits[m].items() if k not in changed[m]} == \
            {k: v for k, v in fits["ppn_bayes-short"].items() if k not in changed[m]}
        assert {k: fits[m][k] for k in changed[m]} == fit_changes(m, steps=fits[m]["steps"])
    assert len({(r["train_tokens"], json.dumps(r["settings"]["fit_data"], sort_keys=True)) for r in records}) == 1


@pytest.mark.slow
def test_issue_15_size_adapters_job_rehearsal_on_cpu(tiny_setup, tmp_path):
    """The next GPU run of benchmarks/README.md on a tiny LM: part14 with the fit of record's
    uniform sizes and size adapters (JOBS fit:0:ppn_bayes:size_power=1/size_rank=2, TOKEN_NLL=1),
    then nll-out of its folder: every size recorded from the fit with its adapters, its token
    NLLs packed, and no ranked checkpoint (which could not carry them) (minutes: slow)."""
    env = _part14_env(tiny_setup, tmp_path, GPUS="1", TOKEN_NLL="1",
                      RECORD_EXTRA="--fit-set compile=none --fit-set warmup_steps=1")
    folder = "seed0-ppn_bayes-size_power1-size_rank2"
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "part14"], cwd=ROOT, check=True, timeout=900,
                   env={**env, "JOBS": "fit:0:ppn_bayes:size_power=1/size_rank=2"})
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "nll-out", folder], cwd=ROOT, check=True, timeout=300, env=env)
    records = [r for r in read_records("quality", tmp_path / "out" / "records") if r["method"] == "ppn_bayes"]
    assert sorted(r["size_requested"] for r in records) == [0.3, 0.4, 0.5, 0.7, 0.9]
    assert all(r["settings"]["fit"]["size_rank"] == 2 and r["settings"]["fit"]["size_power"] == 1 for r in records)
    checkpoint = next((tmp_path / "work" / folder).rglob("adapters.safetensors")).parent
    assert not (tmp_path / "work" / folder / "ranked").exists()
    assert (tmp_path / "out" / f"token-nll-{folder}.safetensors").stat().st_size > 0
    # the records are the sub-networks cut from the fit with its adapters
    fitted = load_fit(checkpoint)
    assert fitted.adapters is not None and fitted.config.size_rank == 2
    assert {r["size_reached"] for r in records} == {fitted.masks(r["size_requested"]).size_reached for r in records}


@pytest.mark.slow
def test_gpu_job_rehearsal_on_cpu(tiny_setup, tmp_path):
    """benchmarks/gpu_job.sh part1 to part6 with a tiny LM on the CPU (minutes: slow)."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("wiki.test.raw", "wiki_summaries_en.txt"):
        (texts / name).write_text((tiny_setup / "text.txt").read_text())
    env = {**os.environ, "OUT": str(tmp_path / "out"), "MODEL": str(tiny_setup / "lm"), "TEXTS": str(texts),
           "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "FIT_STEPS": "20", "FIT_BATCH": "2", "FIT_SEQ": "32",
           "MODEL_NAME": "tiny", "SPEED_EXTRA": "--quick", "RECIPE_STEPS": "3", "SPEC_EXTRA": "--quick",
           "SCALING_EXTRA": "--mlp-group 32 --seq-len 32 --global-batch 2 --steps 3 --warmup 1",
           "RECIPE_EXTRA": "--batch 2 --seq-len 32 --mlp-group 32 --eval-seq-len 64 --limit-windows 2",
           "ABLATION_SIZES": "0.5",
           "QUALITY_EXTRA": "--seq-len 64 --limit-windows 2 --eval-batch 2 --fit-set mlp_group=32 "
                            "--calib-windows 2 --calib-seq-len 32 --sizes 0.7,0.5"}
    for part in ("part1", "part2", "part3"):
        subprocess.run(["bash", "benchmarks/gpu_job.sh", part], cwd=ROOT, env=env, check=True, timeout=900)
    part4 = {**env, "SCALING_EXTRA": "--mlp-group 32 --seq-len 32", "SCALING_BATCHES": "2:3:1 4:3:1"}
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "part4"], cwd=ROOT, env=part4, check=True, timeout=900)
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "part5"], cwd=ROOT, env={**part4, "SCALING_BATCH": "3"},
                   check=True, timeout=900)
    subprocess.run(["bash", "benchmarks/gpu_job.sh", "part6"], cwd=ROOT, env=env, check=True, timeout=900)
    recipes = read_records("recipes", tmp_path / "out" / "records")
    assert {r["recipe"] for r in recipes} == {"default", "lr1e-5", "warm", "shared", "shared-warm", "shared-1e-4"}
    quality = read_records("quality", tmp_path / "out" / "records")
    methods = {r["method"] for r in quality}
    assert {"dense", "ppn_bayes", "ppn_bayes-flat", "ppn_bayes-point", "ppn_bayes-frozen",
            "ppn_bayes-nodistill"} <= methods
    if importlib.util.find_spec("llmcompressor") is not None:  # SparseGPT and Wanda need it
        assert {"sparsegpt", "wanda"} <= methods
    main_steps = {r["settings"]["fit"]["steps"] for r in quality if r["method"] == "ppn_bayes"}
    ablation_steps = {r["settings"]["fit"]["steps"] for r in quality if r["method"].startswith("ppn_bayes-")}
    assert len(main_steps) == 1 and ablation_steps == main_steps
    # part6: the original teacher's fit and its fine-tunes, and the frozen fit's fine-tunes
    tuned = {(r["method"], r["size_requested"]) for r in quality if r["method"].endswith("+distill")}
    assert tuned == {(m, s) for m in ("ppn_bayes-original+distill", "ppn_bayes-frozen+distill")
                     for s in (0.5, 0.4, 0.3)}
    assert {r["settings"]["fit"]["teacher"] for r in quality if r["method"].startswith("ppn_bayes-original")} == {
        "original"}
    speed = read_records("speed", tmp_path / "out" / "records")
    assert {r["method"] for r in speed} >= {"dense", "ppn_bayes"}
    assert read_records("speculative", tmp_path / "out" / "records")
    scaling = read_records("fit", tmp_path / "out" / "records")
    assert {(r["scaling"], r["processes"]) for r in scaling} >= {("weak", 2), ("strong", 2)}
    # part4: one process first, then two against it (its result reused, not recorded twice)
    rows = [r for r in scaling if r["scaling"] == "strong" and r["global_batch"] == 4]
    assert sorted(r["processes"] for r in rows) == [1, 2]
    two = next(r for r in rows if r["processes"] == 2)
    assert two["speedup_vs_1gpu"] > 0 and isinstance(two["curves_agree_in_mean"], bool)
    assert "the result measured before" in (tmp_path / "out" / "scaling.log").read_text()
    # part5: weak scaling with the curve of one process accumulating the same global batch
    weak = next(r for r in read_records("fit", tmp_path / "out" / "records")
                if r["scaling"] == "weak" and r["processes"] == 2 and r["batch_per_gpu"] == 3)
    assert weak["reference_accumulate"] == 2 and len(weak["reference_loss"]) == len(weak["loss"])
    assert weak["max_loss_diff_vs_1gpu"] < 1e-3  # float32 on the CPU: the same steps


def test_no_prior_ablation_fits():
    """quality.py's ``ppn_bayes-point`` ablation (point estimates, ``prior_weight=0``) trains:
    the λ sites leave the ELBO instead of being scaled by zero (which Pyro refuses)."""
    from ppn_bayes.core.config import FitConfig
    from ppn_bayes.fit import fit

    quality = _load("quality")
    assert quality.ABLATIONS["ppn_bayes-point"] == {"posterior": "point", "prior_weight": 0.0}
    lm = tiny_llama(11, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    tokens = torch.randint(0, 11, (400,), generator=torch.Generator().manual_seed(0))
    config = FitConfig(steps=3, batch_size=2, seq_len=16, mlp_group=32, log_every=1,
                       **quality.ABLATIONS["ppn_bayes-point"])
    fitted = fit(lm, tokens, config, progress=False)
    losses = [row["loss"] for row in fitted.result.history]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(fitted.guide.loc_unit.detach(), torch.zeros_like(fitted.guide.loc_unit))


def test_width_cut_and_width_kd_rehearsal(tiny_setup, tmp_path):
    """width (the uniform activation cut, no training) and width-kd (that cut distilled
    from the dense LM) on a tiny LM: the same cut, the tokens asked rounded down to whole
    steps, the data's identity in the records, and a finished size is not trained again."""
    import hashlib

    from ppn_bayes.data import load_tokens, save_tokens

    quality = _load("quality")
    records, work = tmp_path / "records", tmp_path / "work"
    tokenizer = CharTokenizer.from_pretrained(tiny_setup / "lm")
    data = save_tokens(tmp_path / "kd.safetensors", load_tokens(tiny_setup / "text.txt", tokenizer)[:5000],
                       metadata={"source": "rehearsal"})
    args = _tiny_quality_args(tiny_setup, records, "--methods", "width,width-kd", "--width-kd-sizes", "0.5",
                              "--width-kd-data", str(data), "--width-kd-tokens", "200", "--width-mlp-group", "16",
                              "--work-dir", str(work))
    quality.main(args)
    rows = read_records("quality", records)
    assert [(r["method"], r["size_requested"]) for r in rows] == [("width", 0.7), ("width", 0.5), ("width-kd", 0.5)]
    cut, trained = rows[1], rows[2]
    assert cut["train_tokens"] == 0 and trained["train_tokens"] == (200 // (2 * 32)) * 2 * 32
    for r in rows:
        assert r["size_reached"] <= r["size_requested"] and r["layers_kept"] == 3
        assert r["kv_groups_of"] == 2 and r["mlp_channels_of"] == 128 and r["mlp_channels"] % 16 == 0
    assert (cut["kv_groups"], cut["mlp_channels"], cut["size_reached"]) == (
        trained["kv_groups"], trained["mlp_channels"], trained["size_reached"])
    assert trained["ppl_untrained"] == cut["ppl"]  # the same sub-network before training
    settings = trained["settings"]
    assert settings["data"] == "kd.safetensors" and settings["data_tokens"] == 5000
    assert settings["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert settings["data_header"] == {"source": "rehearsal"}
    assert settings["distill"]["steps"] == 3 and settings["distill"]["batch_size"] == 2
    quality.main(args[:args.index("--methods") + 1] + ["width-kd"] + args[args.index("--methods") + 2:])
    assert len(read_records("quality", records)) == 3  # the size is done: not trained again
    with pytest.raises(ValueError, match="no step"):
        quality.main([*args, "--width-kd-tokens", "10"])


def test_width_kd_stopped_by_its_deadline_resumes_to_the_uninterrupted_record(tiny_setup, tmp_path):
    """--width-kd-stop-after: the run stops with a checkpoint and records nothing (already
    past the deadline, after one step); the same command without it resumes there and
    records what an uninterrupted run records, to the bit."""
    quality = _load("quality")

    def args(name, *extra):
        return _tiny_quality_args(tiny_setup, tmp_path / name / "records", "--methods", "width-kd",
                                  "--width-kd-sizes", "0.5", "--width-kd-tokens", "320", "--width-mlp-group", "16",
                                  "--width-kd-checkpoint-every", "0", "--work-dir", str(tmp_path / name), *extra)

    quality.main(args("whole"))
    quality.main(args("stopped", "--width-kd-stop-after", "1e-9"))
    assert read_records("quality", tmp_path / "stopped" / "records") == []
    state = json.loads((tmp_path / "stopped" / "width-kd" / "0.5" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    quality.main(args("stopped"))
    (whole,), (resumed,) = (read_records("quality", tmp_path / name / "records") for name in ("whole", "stopped"))
    assert resumed["settings"]["resumed_from_step"] == 1 and whole["settings"]["resumed_from_step"] == 0
    assert resumed["ppl"] == whole["ppl"] and resumed["train_tokens"] == whole["train_tokens"] == 5 * 2 * 32
    assert resumed["settings"]["final_loss"] == whole["settings"]["final_loss"]
    assert not (tmp_path / "stopped" / "width-kd" / "0.5" / "checkpoint").exists()
    with pytest.raises(ValueError, match="width_kd_stop_after must be positive"):
        quality.main(args("bad", "--width-kd-stop-after", "0"))


@pytest.mark.parametrize("method", [
    "width",
    "width-kd",
])
def test_width_methods_import_neither_pyro_nor_arviz(tiny_setup, tmp_path, method):
    """The GPU machine has no pyro and no arviz: the width methods must run there as they are."""
    records = tmp_path / "records"
    args = _tiny_quality_args(tiny_setup, records, "--methods", method, "--sizes", "0.5", "--width-kd-sizes",
                              "0.5", "--width-kd-tokens", "64", "--width-mlp-group", "16", "--work-dir",
                              str(tmp_path / "work"), "--stop-on-error")
    code = ("import sys, runpy\n"
            "sys.modules['pyro'] = None\nsys.modules['arviz'] = None\n"
            f"sys.argv = ['quality.py', *{args!r}]\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'quality.py')!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["method"] for r in read_records("quality", records)] == [method]


def test_targets_hold_ppn_bayes_against_width_kd_at_equal_tokens(tmp_path):
    rec = tmp_path / "records"

    def add(method, size, ppl, tokens, **extra):
        append_record("quality", method=method, model="M", records_dir=rec, command="cmd", size_requested=size,
                      size_reached=size - 0.004, ppl=ppl, windows=147, seq_len=2048, train_tokens=tokens,
                      quick=False, machine="h200: NVIDIA H200", **extra)

    add("ppn_bayes", 0.5, 26.4, 1000)
    add("ppn_bayes", 0.3, 50.0, 1000)
    add("width-kd", 0.5, 24.0, 1000)  # 26.4 / 24 = 1.10: within 10%
    add("width-kd", 0.5, 10.0, 4000)  # other tokens: not the peer
    add("width-kd", 0.3, 40.0, 4000)
    add("activation-uniform", 0.5, 34533.9, 0, settings={"score": report.OLD_ACTIVATION_SCORE})
    out = tmp_path / "benchmarks.md"
    report.main(["--records-dir", str(rec), "--out", str(out)])
    text = out.read_text()
    assert "| ppn_bayes within 10% of width-kd at 0.5, equal training tokens (1,000) | 26.4 vs 24 | met (ratio 1.10) |" \
        in text
    assert "| ppn_bayes within 10% of width-kd at 0.3, equal training tokens | no width-kd record of 1,000 tokens | – |" \
        in text
    # the table shows the latest record of each size, whatever its tokens
    assert "| uniform width cut + distillation from the dense LM (width-kd) | – | – | 10 (0.496) | – | 40 (0.296) |" \
        in text
    table = text.split("### Protocol runs")[1].split("Produced by")[0]
    assert "activation-ranked units, uniform per layer (Wanda-sp), no training (superseded\\*)" in table
    assert "\\* Superseded: measured with the activation score of before issue 15" in table


def test_the_report_groups_repeats_by_the_identifying_settings():
    from ppn_bayes.core.config import FitConfig

    def key(**fit):
        return report._same_settings({"settings": {"fit": FitConfig(**fit).to_dict()}, "train_tokens": 10,
                                      "windows": 2})

    assert key(eval_sizes=(0.5,), compile="eager", log_every=3, parallel="none") == key()  # do not identify a fit
    assert key(seed=1) == key()  # another seed is a repeat: the spread and the targets read every seed
    assert key(steps=300) != key() and key(autocast="bfloat16") != key()


def test_a_fit_on_another_training_text_is_no_repeat():
    """The same recipe on another mixture (a third free text) is another configuration: the
    targets read only the seeds of the chosen run's text, and the spread shows the two apart."""
    from ppn_bayes.core.config import FitConfig

    def run(method, ppl, seed=0, date="2026-12-01T10:00:00", text="wiki + gen, half and half"):
        return {"method": method, "size_requested": 0.5, "ppl": ppl, "train_tokens": 10, "windows": 2, "date": date,
                "settings": {"fit": FitConfig(seed=seed).to_dict(), "train_text": text} if method == "ppn_bayes"
                else {}}

    records = [run("sparsegpt", 100.0), run("wanda", 140.0), run("ppn_bayes", 90.0),
               run("ppn_bayes", 150.0, date="2026-12-01T11:00:00", text="wiki + gen + gen-free, 1/3 each"),
               run("ppn_bayes", 95.0, seed=1, date="2026-12-01T12:00:00")]
    text = "\n".join(report.targets(records))
    assert "| ppn_bayes below SparseGPT, unstructured at 0.5 | 90 to 95 (2 runs) vs 100 | met (ratio 0.95, " \
           "the worst run) |" in text
    spread = "\n".join(report.spread_table(records))
    assert "| ppn_bayes | wiki + gen, half and half | 10 | 90 to 95 (2) |" in spread and "150" not in spread


def test_width_kd_at_another_rate_is_no_repeat_and_the_target_takes_its_best_rate():
    """width-kd runs that differ in the LM's rate or beta2 are other configurations (a record
    from before adam_beta2 was a setting ran PyTorch's 0.999); the equal-token target holds
    ppn_bayes against width-kd's best measured setting; the rate table lists each setting."""
    from ppn_bayes.core.config import FitConfig

    def run(method, ppl, date, seed=0, **rate):
        settings = ({"fit": FitConfig(seed=seed, **rate).to_dict()} if method == "ppn_bayes"
                    else {"distill": {"seed": seed, **rate}})
        return {"method": method, "size_requested": 0.5, "ppl": ppl, "train_tokens": 10, "windows": 2, "date": date,
                "settings": settings}

    records = [run("width-kd", 64.0, "2026-12-01", lr=1e-4),
               run("width-kd", 47.0, "2026-12-02T01", lr=1e-3, adam_beta2=0.95),
               run("width-kd", 48.0, "2026-12-02T02", seed=1, lr=1e-3, adam_beta2=0.95),
               run("width-kd", 49.0, "2026-12-02T03", lr=1e-3, adam_beta2=0.999),
               run("width-kd", 53.0, "2026-12-02T04", lr=3e-3),
               run("ppn_bayes", 60.0, "2026-12-01", lr_lm=1e-4),
               run("ppn_bayes", 50.0, "2026-12-02T05", lr_lm=1e-3, adam_beta2=0.95)]
    text = "\n".join(report.targets(records))
    assert "| ppn_bayes within 10% of width-kd at 0.5, equal training tokens (10) | 50 vs 47 (lr 0.001, beta2 0.95) | " \
           "met (ratio 1.06) |" in text
    spread = "\n".join(report.spread_table(records))
    assert "| 47 to 48 (2) |" in spread and not any(f" {p:g} " in spread for p in (49.0, 53.0, 64.0))
    rates = "\n".join(report.rate_table(records))
    for row in ("| ppn_bayes | 10 | 0.0001 | 0.999 | 60 | – |", "| ppn_bayes | 10 | 0.001 | 0.95 | 50 | – |",
                "| 10 | 0.0001 | 0.999 | 64 | – |", "| 10 | 0.001 | 0.95 | 47 to 48 (2) | – |",
                "| 10 | 0.001 | 0.999 | 49 | – |", "| 10 | 0.003 | 0.999 | 53 | – |"):
        assert row in rates
    # a newer width-kd run at more tokens and one rate: its row joins, the sweep at 10 tokens stays
    longer = {**run("width-kd", 40.0, "2026-12-03", lr=1e-3, adam_beta2=0.95), "train_tokens": 100}
    rates = report.rate_table(records + [longer])
    rows = [line for line in rates if line.startswith("| ") and "width-kd" in line]
    assert [row.split(" | ")[1:4] for row in rows] == [["10", "0.0001", "0.999"], ["10", "0.001", "0.95"],
                                                       ["10", "0.001", "0.999"], ["10", "0.003", "0.999"],
                                                       ["100", "0.001", "0.95"]]
    assert rows[-1].endswith("| 40 | – |")


def test_each_ablation_is_held_against_the_fit_it_ablates():
    """The ablation table pairs each ablation's latest run with the reference fit whose settings
    are its own but the ablation's changes, at the same seed and tokens (here the shorter variant,
    not the longer fit of record); ratios are the ablation's perplexity over the reference's."""
    from ppn_bayes.core.config import FitConfig

    protocol = _load("protocol")

    def run(method, size, ppl, *, steps, seed=0, date="2026-12-02"):
        fit = FitConfig(steps=steps, seed=seed, **protocol.fit_changes(method)).to_dict()
        return {"method": method, "size_requested": size, "ppl": ppl, "train_tokens": steps, "windows": 2,
                "date": date, "settings": {"fit": fit}}

    records = [run("ppn_bayes", 0.5, 40.0, steps=100), run("ppn_bayes", 0.3, 60.0, steps=100),
               run("ppn_bayes-point", 0.5, 44.0, steps=100, date="2026-12-01"),
               run("ppn_bayes-short", 0.5, 50.0, steps=10), run("ppn_bayes-short", 0.3, 80.0, steps=10),
               run("ppn_bayes-flat", 0.5, 55.0, steps=10), run("ppn_bayes-flat", 0.3, 88.0, steps=10),
               run("ppn_bayes-point", 0.5, 60.0, steps=10, date="2026-12-03"),
               run("ppn_bayes-frozen", 0.5, 70.0, steps=10, seed=1)]  # no seed-1 reference: not shown
    table = [line for line in report.ablation_table(records) if line.startswith("| ppn_bayes")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert [c[0] for c in cells] == [report.label("ppn_bayes-short"), report.label("ppn_bayes-flat"),
                                     report.label("ppn_bayes-point")]
    sizes = [f"{s:g}" for s in report.PROTOCOL_SIZES]
    at = {size: sizes.index(size) + 4 for size in ("0.5", "0.3")}
    assert cells[0][1:3] == ["10", "0"] and (cells[0][at["0.5"]], cells[0][at["0.3"]]) == ("50", "80")
    assert (cells[1][at["0.5"]], cells[1][at["0.3"]]) == ("55 (1.10)", "88 (1.10)")
    assert (cells[2][at["0.5"]], cells[2][at["0.3"]]) == ("60 (1.20)", "–")
    # without the newer runs, the older point estimate pairs with the fit of record it ablates
    older = [r for r in records if r["train_tokens"] == 100]
    table = [line for line in report.ablation_table(older) if line.startswith("| ppn_bayes")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert [(c[0], c[at["0.5"]]) for c in cells] == [(report.label("ppn_bayes"), "40"),
                                                     (report.label("ppn_bayes-point"), "44 (1.10)")]


def test_a_setting_ablation_is_held_against_every_run_of_its_reference():
    """A run of the reference's own method with SETTING_ABLATIONS fields set (settling, averaging)
    is an ablation of the same fit with them at their defaults: same seed, tokens, every other
    setting. The reference row shows its reruns' range, and each ratio is to their geometric mean
    (40 and 90 at 0.5: 60); another seed's reference does not count, nor a run with a setting the
    ablation does not name."""
    from ppn_bayes.core.config import FitConfig

    def run(ppl, *, seed=0, date="2026-12-02", **fit):
        return {"method": "ppn_bayes-short", "size_requested": 0.5, "ppl": ppl, "train_tokens": 10, "windows": 2,
                "date": date, "settings": {"fit": FitConfig(steps=10, seed=seed, **fit).to_dict()}}

    records = [run(40.0), run(90.0, date="2026-12-03"), run(10.0, seed=1), run(20.0, seed=0, lr_lm=1.0),
               run(54.0, settle_steps=3), run(66.0, settle_steps=3, average_steps=3),
               run(30.0, settle_steps=3, date="2026-12-01")]  # an older run of the same setting: not shown
    table = [line for line in report.ablation_table(records) if line.startswith("| ppn_bayes")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    at = [f"{s:g}" for s in report.PROTOCOL_SIZES].index("0.5") + 4
    short = report.label("ppn_bayes-short")
    assert [(c[0], c[at]) for c in cells] == [(short, "40 to 90 (2)"),
                                              (f"{short}, settle_steps=3", "54 (0.90)"),
                                              (f"{short}, settle_steps=3, average_steps=3", "66 (1.10)")]


def test_the_short_fits_are_held_against_width_kd_short_at_equal_tokens():
    """ppn_bayes-short's runs without a setting ablation (here 40 and 90: geometric mean 60) against
    width-kd-short at the same size and tokens (its latest run); a settling run, a run at other
    tokens and width-kd at the fit of record's tokens do not count."""
    from ppn_bayes.core.config import FitConfig

    def fit(ppl, size=0.5, *, tokens=10, date="2026-12-02", **changes):
        return {"method": "ppn_bayes-short", "size_requested": size, "ppl": ppl, "train_tokens": tokens,
                "windows": 2, "date": date,
                "settings": {"fit": FitConfig(steps=10, warmup_steps=1, **changes).to_dict()}}

    def kd(ppl, size=0.5, *, method="width-kd-short", tokens=10, date="2026-12-04"):
        return {"method": method, "size_requested": size, "ppl": ppl, "train_tokens": tokens, "windows": 2,
                "date": date, "settings": {"distill": {"warmup_steps": 1}}}

    records = [fit(40.0), fit(90.0), fit(10.0, settle_steps=3), fit(20.0, tokens=20), fit(70.0, 0.3),
               kd(30.0, date="2026-12-01"), kd(50.0), kd(1.0, method="width-kd"), kd(35.0, 0.3, tokens=20)]
    table = [line for line in report.short_width_kd_table(records) if line.startswith("| 0.")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells == [["0.5", "10", "40 to 90 (2 runs)", "50", "1.20", "1 / 1"]]
    assert report.short_width_kd_table([r for r in records if r["method"] != "width-kd-short"]) == []


def test_a_target_holds_only_when_every_seed_meets_it():
    """Two seeds of the fit of record at 0.4: one below SparseGPT, one above; the target is
    missed, by the worst run's ratio. An older run of the same seed does not count."""
    from ppn_bayes.core.config import FitConfig

    def run(method, ppl, seed=0, date="2026-12-01T10:00:00", size=0.4):
        return {"method": method, "size_requested": size, "ppl": ppl, "train_tokens": 10, "windows": 2, "date": date,
                "settings": {"fit": FitConfig(seed=seed).to_dict()} if method == "ppn_bayes" else {}}

    records = [run("sparsegpt", 100.0), run("wanda", 140.0), run("ppn_bayes", 500.0, seed=1, date="2026-11-30"),
               run("ppn_bayes", 90.0), run("ppn_bayes", 120.0, seed=1)]
    text = "\n".join(report.targets(records))
    assert "| ppn_bayes below SparseGPT, unstructured at 0.4 | 90 to 120 (2 runs) vs 100 | missed (ratio 1.20, " \
           "the worst run) |" in text
    assert "| ppn_bayes below Wanda, unstructured at 0.4 | 90 to 120 (2 runs) vs 140 | met (ratio 0.86, " \
           "the worst run) |" in text


def test_the_width_kd_and_dense_targets_hold_every_seed_too():
    """At 0.5 the latest run (seed 0, 40) is within 10% of width-kd (42) and the other seed (47) is
    not: the target is missed by the worse seed's ratio, as the SparseGPT and Wanda targets are;
    the dense target is judged by the same run."""
    from ppn_bayes.core.config import FitConfig

    def run(method, ppl, seed=0, date="2026-12-01T10:00:00", size=0.5):
        return {"method": method, "size_requested": size, "ppl": ppl, "train_tokens": 10, "windows": 2, "date": date,
                "settings": {"fit": FitConfig(seed=seed).to_dict()} if method == "ppn_bayes" else {}}

    records = [run("width-kd", 42.0), run("dense", 20.0, size=1.0), run("ppn_bayes", 47.0, seed=1, date="2026-11-30"),
               run("ppn_bayes", 40.0)]
    text = "\n".join(report.targets(records))
    assert "| ppn_bayes within 10% of width-kd at 0.5, equal training tokens (10) | 40 to 47 (2 runs) vs 42 | " \
           "missed (ratio 1.12, the worst run) |" in text
    assert "| ppn_bayes within 1.3 x dense at 0.5 | 40 to 47 (2 runs) vs 20 | missed (2.35 x dense, the worst run) |" \
        in text


def test_a_superseded_record_is_no_repeat_of_its_rerun(tmp_path):
    """A baseline rerun after a fix (same settings but the score) shows alone: the spread table
    does not pair it with the superseded run, and the table shows the rerun unmarked."""
    rec = tmp_path / "records"
    for ppl, settings in ((34533.9, {"score": report.OLD_ACTIVATION_SCORE}), (685.6, {"score": "new"}),
                          (690.1, {"score": "new"})):
        append_record("quality", method="activation-uniform", model="M", records_dir=rec, command="cmd",
                      size_requested=0.5, size_reached=0.497, ppl=ppl, windows=147, seq_len=2048, train_tokens=0,
                      quick=False, machine="h200: NVIDIA H200", settings=settings)
    lines = report.spread_table(read_records("quality", rec))
    assert [line for line in lines if "activation" in line] == [
        "| activation-ranked units, uniform per layer (Wanda-sp), no training | – | 0 | 685.6 to 690.1 (2) |"]
    assert "superseded" not in "\n".join(report.quality_table(read_records("quality", rec)))


def test_width_kd_mixes_several_stores_with_the_training_text_in_equal_shares(tiny_setup, tmp_path):
    """--width-kd-data A,B (two token stores) trains on the training text, A and B, a third
    each; a missing store is named before any work."""
    from ppn_bayes.data import load_tokens
    from ppn_bayes.store import write_store

    quality = _load("quality")
    tokenizer = CharTokenizer.from_pretrained(tiny_setup / "lm")
    tokens = load_tokens(tiny_setup / "text.txt", tokenizer)
    stores = [write_store(tmp_path / name, tokens[i * 2000:(i + 1) * 2000], vocab_size=tokenizer.vocab_size,
                          tokenizer="char") for i, name in enumerate(("gen", "free"))]
    records = tmp_path / "records"
    args = _tiny_quality_args(tiny_setup, records, "--methods", "width-kd", "--width-kd-sizes", "0.5",
                              "--width-kd-data", f"{tmp_path / 'gen'},{tmp_path / 'free'}", "--width-kd-tokens",
                              "128", "--width-mlp-group", "16", "--work-dir", str(tmp_path / "work"))
    quality.main(args)
    settings = read_records("quality", records)[-1]["settings"]
    assert settings["data"] == "text.txt + gen + free, 1/3 each"
    sources = settings["fit_data"]["sources"]
    assert [s["kind"] for s in sources] == ["tensor", "store", "store"]
    assert [s["weight"] for s in sources] == [1 / 3] * 3
    assert [s["sha256"] for s in sources[1:]] == [store.identity()["sha256"] for store in stores]
    with pytest.raises(ValueError, match=r"--width-kd-data .*nowhere: no such file or folder"):
        quality.main([*args, "--width-kd-data", f"{tmp_path / 'gen'},{tmp_path / 'nowhere'}"])


def test_token_kinds_read_wikitext_markup_across_tokens():
    token_nll = _load("token_nll")
    texts = [" = ", "= ", "Game", "play", " = ", "=", " \n", " A", " well", " @-@ ", "known", " game", ",", " 1",
             " @,@ ", "000", " <unk>", "."]
    assert token_nll.kinds_of(texts) == ["markup"] * 7 + [
        "word start", "word start", "markup", "word inside", "word start", "punctuation", "digits", "markup",
        "digits", "markup", "punctuation"]
    assert token_nll.kinds_of([" ", "a", "=", " b"]) == ["whitespace", "word inside", "punctuation", "word start"]


def test_token_nll_keeps_every_evaluated_token_and_says_where_the_excess_goes(tiny_setup, tmp_path):
    """quality.py --token-nll-dir: one float16 file per record and the windows' targets; the
    record's NLL by context averages back to its NLL; pack + analyse: the excess over dense is
    the difference of the two files' means, its shares by kind sum to one."""
    from safetensors.torch import load_file, save_file

    from ppn_bayes.data import load_tokens

    quality, token_nll = _load("quality"), _load("token_nll")
    folder, records = tmp_path / "nll", tmp_path / "records"
    quality.main(_tiny_quality_args(tiny_setup, records, "--methods", "dense,magnitude", "--sizes", "0.5",
                                    "--token-nll-dir", str(folder)))
    assert sorted(p.name for p in folder.iterdir()) == ["dense@1.safetensors", "magnitude@0.5.safetensors",
                                                        "targets.safetensors"]
    tokenizer = CharTokenizer.from_pretrained(tiny_setup / "lm")
    windows = TokenBlocks(load_tokens(tiny_setup / "text.txt", tokenizer), 64).windows(2)
    assert torch.equal(load_file(folder / "targets.safetensors")["targets"], windows[:, 1:].to(torch.int32))
    by_record = {r["method"]: r for r in read_records("quality", records)}
    for method, name in (("dense", "dense@1"), ("magnitude", "magnitude@0.5")):
        record, nll = by_record[method], load_file(folder / f"{name}.safetensors")["nll"]
        assert nll.shape == (2, 63) and nll.dtype == torch.float16
        assert float(nll.double().mean()) == pytest.approx(record["nll"], rel=1e-3)  # float16: 2^-11 of each value
        buckets = record["nll_by_context"]
        assert sum(b["tokens"] for b in buckets) == 2 * 63
        # the record's NLL adds a float32 sum of 2 · 63 losses: within 125 · 2⁻²⁴ ≈ 7.5e-6 of itself
        assert sum(b["nll"] * b["tokens"] for b in buckets) / (2 * 63) == pytest.approx(record["nll"], rel=1e-5)

    packed = tmp_path / "packed.safetensors"
    token_nll.main(["pack", str(folder), str(packed)])
    [summary] = token_nll.analyse(packed, tokenizer)
    dense, magnitude = (load_file(folder / f"{n}.safetensors")["nll"].double() for n in ("dense@1", "magnitude@0.5"))
    assert summary["network"] == "magnitude@0.5" and summary["against"] == "dense@1"
    assert summary["mean_excess"] == pytest.approx(float(magnitude.mean() - dense.mean()), rel=1e-9)
    assert sum(k["share_of_excess"] for k in summary["by_kind"].values()) == pytest.approx(1.0, rel=1e-9)
    assert sum(k["tokens"] for k in summary["by_kind"].values()) == 2 * 63
    assert list(summary["by_context"]) == ["1", "2-3", "4-7", "8-15", "16-31", "32-63"]
    token_nll.main(["analyse", str(packed), "--tokenizer", str(tiny_setup / "lm"), "--records-dir", str(records)])
    [record] = read_records("token_nll", records)
    assert record["method"] == "magnitude" and record["size_requested"] == 0.5
    # the quality record the losses came from: method, size and NLL to the bit (magnitude: untrained)
    assert record["source"] == f"{by_record['magnitude']['date'][:16]}, 0 tokens"
    assert token_nll.source_of("magnitude@0.5", by_record["magnitude"]["nll"] + 1e-12,
                               read_records("quality", records)) is None
    kd = {"method": "width-kd", "size_requested": 0.5, "nll": 4.0, "date": "2026-12-02T02:30:00", "train_tokens": 10,
          "settings": {"distill": {"lr": 1e-3, "adam_beta2": 0.95}, "fit": {"lr_lm": 1e-4}}}
    assert token_nll.source_of("width-kd@0.5", 4.0, [kd]) == "2026-12-02T02:30, 10 tokens, lr 0.001, beta2 0.95"
    assert "## Where the loss goes" in report.render(records, tmp_path / "report.md", tmp_path / "img")
    with pytest.raises(SystemExit, match="no losses of 'wanda@1'"):
        token_nll.analyse(packed, tokenizer, against="wanda@1")
    # the dense LM's losses from another packed file of the same windows: the same summary, to the bit
    alone = {name: tmp_path / name for name in ("dense", "magnitude")}
    for name, path in alone.items():
        path.mkdir()
        for kept in ("targets.safetensors", f"{name}@{'1' if name == 'dense' else '0.5'}.safetensors"):
            (path / kept).write_bytes((folder / kept).read_bytes())
        token_nll.pack([path], tmp_path / f"{name}.safetensors")
    with pytest.raises(SystemExit, match="--reference FILE"):
        token_nll.analyse(tmp_path / "magnitude.safetensors", tokenizer)
    assert token_nll.analyse(tmp_path / "magnitude.safetensors", tokenizer,
                             reference=tmp_path / "dense.safetensors") == [summary]
    with pytest.raises(SystemExit, match="no losses of 'dense@1'"):
        token_nll.analyse(tmp_path / "dense.safetensors", tokenizer, reference=tmp_path / "magnitude.safetensors")
    other = load_file(folder / "targets.safetensors")["targets"].flip(0).contiguous()
    save_file({"targets": other}, alone["dense"] / "targets.safetensors")
    token_nll.pack([alone["dense"]], tmp_path / "shifted.safetensors")
    with pytest.raises(SystemExit, match="other evaluation windows"):
        token_nll.analyse(tmp_path / "magnitude.safetensors", tokenizer, reference=tmp_path / "shifted.safetensors")
    with pytest.raises(SystemExit, match="dense@1 is in two of the folders"):
        token_nll.pack([folder, folder], tmp_path / "twice.safetensors")
    (folder / "targets.safetensors").unlink()
    with pytest.raises(SystemExit, match="no targets.safetensors"):
        token_nll.pack([folder], tmp_path / "again.safetensors")


def test_settle_benchmark_compares_fits_with_and_without_settling(tmp_path):
    """benchmarks/settle.py: one record per settle_steps value and size, its perplexity the
    geometric mean of the seeds' between the lowest and the highest; the share of gates that
    moved at the end is 0 for a settled fit (its guide was frozen between the last two
    evaluations); bad flags are refused before the tiny LM is built."""
    settle = _load("settle")
    records = tmp_path / "records"
    with pytest.raises(SystemExit, match=r"--settle 3\+2 is more than --steps 4"):
        settle.main(["--steps", "4", "--settle", "0,3+2", "--records-dir", str(records)])
    with pytest.raises(SystemExit, match=r"--settle 0\+2: averaging needs settling"):
        settle.main(["--steps", "4", "--settle", "0+2", "--records-dir", str(records)])
    with pytest.raises(SystemExit, match=r"--sizes must lie in \(0, 1\]"):
        settle.main(["--sizes", "0.5,1.5", "--records-dir", str(records)])
    assert not records.exists()
    settle.main(["--seeds", "0,1", "--steps", "4", "--settle", "0,2,1+2", "--sizes", "0.7,0.4", "--pretrain-steps",
                 "2", "--eval-windows", "2", "--records-dir", str(records)])
    rows = read_records("settle", records)
    assert [(r["method"], r["size_requested"]) for r in rows] == [
        ("ppn_bayes, settle_steps=0", 0.7), ("ppn_bayes, settle_steps=0", 0.4),
        ("ppn_bayes, settle_steps=2", 0.7), ("ppn_bayes, settle_steps=2", 0.4),
        ("ppn_bayes, settle_steps=1, average_steps=2", 0.7), ("ppn_bayes, settle_steps=1, average_steps=2", 0.4)]
    assert [r["average_steps"] for r in rows] == [0, 0, 0, 0, 2, 2]
    for r in rows:
        assert r["seeds"] == 2 and len(r["ppl_each_seed"]) == 2 and r["train_tokens"] == 4 * 16 * 128
        assert r["ppl"] == pytest.approx(math.exp(sum(map(math.log, r["ppl_each_seed"])) / 2), rel=1e-12)
        assert r["ppl_lowest"] <= r["ppl"] <= r["ppl_highest"]
        assert r["excess"] == pytest.approx(math.log(r["ppl"] / r["dense_ppl"]), rel=1e-9, abs=1e-12)
        assert r["excess_lowest"] <= r["excess"] <= r["excess_highest"]
        assert 0 <= r["gates_moved_at_the_end"] <= 1
        assert r["settings"]["fit"]["settle_steps"] == r["settle_steps"]
        assert r["settings"]["fit"]["average_steps"] == r["average_steps"]
    # settle_steps=2 of 4, evaluated at steps 2 and 4: the guide did not move between them
    assert all(r["gates_moved_at_the_end"] == 0 for r in rows if r["settle_steps"] == 2)
    assert "## Settling" in report.render(records, tmp_path / "report.md", tmp_path / "img")


def test_a_quality_row_shows_one_configuration():
    """Two settings of one method recorded side by side (their dates interleave by size) and an
    older run (another setting, a held start) at a size neither has: the row takes every size its
    newest configuration measured from that configuration alone, and leaves the older run's size
    out: "–" there, and no mark of the held start (its note would not hold for the row)."""
    from ppn_bayes.core.config import FitConfig

    def run(size, ppl, date, **fit):
        return {"method": "ppn_bayes-short", "size_requested": size, "size_reached": size, "ppl": ppl, "date": date,
                "train_tokens": 10, "windows": 2, "settings": {"fit": FitConfig(steps=10, **fit).to_dict()}}

    records = [run(0.7, 70.0, "2026-12-01", hold_steps=2),
               run(0.5, 51.0, "2026-12-03T06:00:02", settle_steps=3), run(0.5, 50.0, "2026-12-03T06:00:01"),
               run(0.3, 81.0, "2026-12-03T06:00:03", settle_steps=3), run(0.3, 80.0, "2026-12-03T06:00:04")]
    chosen = report.row_records(records)
    assert {size: r["ppl"] for (_, size), r in chosen.items()} == {0.5: 50.0, 0.3: 80.0}
    table = report.quality_table(records)
    header, row = ([c.strip() for c in line.strip("|").split("|")] for line in (table[0], table[2]))
    assert row[0] == report.label("ppn_bayes-short") and row[header.index("0.7")] == "–"
    assert row[header.index("0.5")] == "50 (0.500)" and row[header.index("0.3")] == "80 (0.300)"
    assert "‡" not in "\n".join(table)
    # the held start's run alone is the newest: its row, with its mark
    assert "‡" in "\n".join(report.quality_table(records[:1]))


def _rankings_file(path: Path, ranking, **extra) -> None:
    """A rankings file as ``quality.py --rankings`` writes it."""
    path.write_text(json.dumps({"format": "ppn_bayes.rankings", "format_version": 1, "rankings": {"ppn_bayes": {
        "model": "M", "architecture": ranking.arch.to_dict(), **ranking.to_dict(), **extra}}}))


def test_allocation_section_lists_each_layers_kept_units_as_the_masks_keep_them(tmp_path):
    from ppn_bayes.core.architecture import describe
    from ppn_bayes.core.ranking import Ranking
    from ppn_bayes.io import FileFormatError

    arch = describe(tiny_llama(11, layers=6, hidden=32, heads=4, kv_heads=2, intermediate=64), mlp_group=8)
    ranking = Ranking.random(arch, seed=1)  # at 0.5 it keeps a layer with no unit
    rankings = tmp_path / "rankings"
    rankings.mkdir()
    _rankings_file(rankings / "fit.json", ranking, fit={"seed": 1}, train_tokens=1234)
    lines = report.allocation_section(rankings, [], tmp_path / "img", "img")
    rows = {float(cells[0]): cells for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines if re.match(r"\| 0\.\d ", line))}
    assert sorted(rows) == sorted(report.PROTOCOL_SIZES)
    A = arch.n_attention_units
    for size, (_, reached, layers, attention, mlp) in rows.items():
        masks = ranking.masks(size)
        assert reached == f"{masks.size_reached:.3f}"
        kept = masks.layer.tolist()
        with_units = sum(keep and bool(masks.unit[l].any()) for l, keep in enumerate(kept))
        assert layers == f"{sum(kept)} of {arch.n_layers}" + (
            f" ({with_units} with units)" if with_units < sum(kept) else "")
        # one mark a layer: '-' exactly where the masks drop the layer, else its kept units of each kind
        assert list(attention) == ["-" if not keep else str(int(masks.unit[l, :A].sum()))
                                   for l, keep in enumerate(masks.layer.tolist())]
        assert mlp.split(" ") == ["-" if not keep else str(int(masks.unit[l, A:].sum()))
                                  for l, keep in enumerate(masks.layer.tolist())]
    assert rows[0.5][2] == "6 of 6 (5 with units)"
    assert "seed 1, 1,234 training tokens" in "\n".join(lines)
    assert (tmp_path / "img" / "allocation-fit-ppn_bayes.png").stat().st_size > 0
    # a fit that trained 0.5 alone: its other sizes read the same, marked, and without the warning
    one = tmp_path / "one"
    one.mkdir()
    _rankings_file(one / "alone.json", ranking.trained_on(0.5, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        marked = [line for line in report.allocation_section(one, [], tmp_path / "img", "img")
                  if re.match(r"\| 0\.\d ", line)]
    assert [line.split(" | ")[0] for line in marked] == [
        f"| {size:g}" + ("" if size == 0.5 else " (untrained)") for size in report.PROTOCOL_SIZES]
    assert [line.split(" | ", 1)[1] for line in marked] == [
        line.split(" | ", 1)[1] for line in lines if re.match(r"\| 0\.\d ", line)]
    # nothing to show: no section; a file of another kind: an error that names it
    assert report.allocation_section(tmp_path / "none", [], tmp_path / "img", "img") == []
    (rankings / "other.json").write_text(json.dumps({"format": "ppn_bayes.masks", "rankings": {}}))
    with pytest.raises(FileFormatError, match="other.json is not a rankings file"):
        report.allocation_section(rankings, [], tmp_path / "img", "img")


def test_structure_section_counts_the_layers_each_evaluation_keeps_units_in(tmp_path):
    """Two evaluations of a fit (the masks of two rankings at 0.9 and 0.5) beside its rankings
    file: each cell is the layers whose deployed masks keep a unit, counted from the masks
    themselves, with the held-out perplexity; a kept layer with no unit does not count; a
    validation file with no rankings file beside it is named as skipped."""
    import torch

    from ppn_bayes.core.architecture import describe
    from ppn_bayes.core.ranking import Ranking

    arch = describe(tiny_llama(11, layers=6, hidden=32, heads=4, kv_heads=2, intermediate=64), mlp_group=8)
    rankings, validation = tmp_path / "rankings", tmp_path / "validation"
    rankings.mkdir()
    validation.mkdir()
    first, last = Ranking.random(arch, seed=3), Ranking.random(arch, seed=4)
    _rankings_file(rankings / "fit.json", last)
    rows, expected = [], {}
    for step, ranking in ((5, first), (10, last)):
        sizes = []
        for size, nll in ((0.9, 1.0), (0.5, 2.0)):
            masks = ranking.masks(size)
            marks = masks.marks()
            if step == 10 and size == 0.5:  # layer 0 kept with no unit: it computes nothing
                L = arch.n_layers
                U = len(marks) // L - 1
                marks = "1" + marks[1:L] + "0" * U + marks[L + U:]
            flat = torch.tensor([m == "1" for m in marks])
            layer, unit = flat[:arch.n_layers], flat[arch.n_layers:].view(arch.n_layers, -1)
            if step == 10 and size == 0.5:
                assert layer[0] and not unit[0].any()  # counting kept layers alone would count it
            expected[(size, step)] = f"{int((layer & unit.any(-1)).sum())} · {math.exp(nll):.1f}"
            sizes.append({"size": size, "nll": nll, "kept": marks})
        rows.append({"step": step, "nll_full": 0.5, "windows": 2, "sizes": sizes})
    (validation / "fit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (validation / "orphan.jsonl").write_text(json.dumps(rows[0]) + "\n")
    lines = report.structure_section(validation, rankings, tmp_path / "img", "img")
    text = "\n".join(lines)
    for size in (0.9, 0.5):
        table = text.split(f"### Size {size:g}")[1].split("\n\n")[1].splitlines()
        assert table[0] == "| fit | 5 | 10 |"
        assert table[2] == f"| `fit` (6 layers) | {expected[(size, 5)]} | {expected[(size, 10)]} |"
    assert "`orphan.jsonl`" in text.split("Skipped")[1]
    assert (tmp_path / "img" / "structure-along-the-fits.png").stat().st_size > 0
    assert report.structure_section(tmp_path / "none", rankings, tmp_path / "img", "img") == []


def test_a_ratio_just_past_its_limit_is_printed_past_it():
    """43.176 against width-kd's 39.22 is 1.1009: missed, and printed 1.101, not a missed 1.10; a
    ratio that two decimals show on its own side keeps two (26.4 / 24, met, 1.10); a rival beaten
    by less than half a percent reads below 1 (0.999), not 1.00."""
    def run(method, ppl, size=0.5):
        return {"method": method, "size_requested": size, "ppl": ppl, "train_tokens": 10, "windows": 2,
                "date": "2026-12-01T10:00:00", "settings": {}}

    text = "\n".join(report.targets([run("width-kd", 39.22), run("ppn_bayes", 43.176), run("sparsegpt", 43.2)]))
    assert "| 43.18 vs 39.22 | missed (ratio 1.101) |" in text
    assert "| ppn_bayes below SparseGPT, unstructured at 0.5 | 43.18 (1 run) vs 43.2 | met (ratio 0.999) |" in text
    assert report._ratio(26.4 / 24, 1.1) == "1.10"
    assert report._ratio(1.3004, 1.3) == "1.3004"
    assert report._ratio(0.5, 1.0, strict=True) == "0.50"


def test_a_fit_that_names_its_sizes_says_so_under_the_quality_table():
    """A row whose fit trains named sizes (train_sizes) is marked, and a note under the table
    names them and size_min, so an off-ladder size (0.4 here) reads as one; a fit without them
    (older records have no such key) is not marked. A fit that holds its start (hold_steps)
    is marked and noted the same way, with its own mark, and so is one that settles its masks
    at the end (settle_steps) or reads size adapters (size_rank); the notes follow the rows' order."""
    def run(method, size, ppl, fit=None):
        return {"method": method, "size_requested": size, "size_reached": size, "ppl": ppl, "windows": 2,
                "train_tokens": 10, "date": "2026-12-01T10:00:00", "settings": {"fit": fit} if fit else {}}

    fit = {"train_sizes": [0.5, 0.7, 0.9], "size_min": 0.3, "n_random_sizes": 2, "seed": 0}
    lines = report.quality_table([run("ppn_bayes", 0.5, 40.0, fit), run("ppn_bayes", 0.4, 50.0, fit),
                                  run("ppn_bayes-flat", 0.5, 45.0, {"size_min": 0.3, "seed": 0})])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ppn_bayes")}
    assert list(rows) == ["ppn_bayes †", "ppn_bayes, flat units (no hierarchy)"]
    assert lines[-1] == ("† ppn_bayes: every step of the fit trains the sizes 0.5, 0.7, 0.9 (`train_sizes`) besides "
                         "`size_min` 0.3; the other sizes only through its 2 random sizes a step.")
    held = {"hold_steps": 1000, "steps": 3052, "size_min": 0.3, "seed": 0}
    lines = report.quality_table([run("ppn_bayes", 0.5, 40.0, held), run("ppn_bayes-flat", 0.5, 45.0, fit)])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ppn_bayes")}
    assert list(rows) == ["ppn_bayes ‡", "ppn_bayes, flat units (no hierarchy) †"]
    assert lines[-3:] == ["‡ ppn_bayes: the first 1,000 of the fit's 3,052 steps hold the guide at its start and train "
                          "the LM on the start's masks (`hold_steps`); the posterior learns after.", "",
                          "† ppn_bayes, flat units (no hierarchy): every step of the fit trains the sizes 0.5, 0.7, 0.9 "
                          "(`train_sizes`) besides `size_min` 0.3; the other sizes only through its 2 random sizes a "
                          "step."]
    # settled masks at the end: their own mark, with the averaged steps where the fit averages
    settled = {"settle_steps": 1500, "average_steps": 300, "steps": 3052, "size_min": 0.5, "seed": 0}
    lines = report.quality_table([run("ppn_bayes-alone", 0.5, 40.5, settled),
                                  run("ppn_bayes", 0.5, 43.0, {**held, "settle_steps": 2, "steps": 4})])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ppn_bayes")}
    assert list(rows) == ["ppn_bayes ‡ §", f"{report.label('ppn_bayes-alone')} §"]
    assert lines[-3] == ("§ ppn_bayes: the last 2 of the fit's 4 steps train the LM on the masks that ship, those of "
                         "the guide then (`settle_steps`).")
    assert lines[-1] == (f"§ {report.label('ppn_bayes-alone')}: the last 1,500 of the fit's 3,052 steps train the LM on "
                         "the masks that ship, those of the guide averaged over the 300 steps before (`settle_steps`, "
                         "`average_steps`).")
    # size adapters: their own mark, with the rank and the anchors
    adapted = {"size_rank": 16, "size_anchors": [0.3, 0.5, 1.0], "size_min": 0.3, "seed": 0}
    lines = report.quality_table([run("ppn_bayes", 0.5, 41.0, adapted)])
    assert lines[2].startswith("| ppn_bayes ¶ |")
    assert lines[-1] == ("¶ ppn_bayes: each size reads its own low-rank correction of the output projections, size "
                         "adapters of rank 16 at the sizes 0.3, 0.5, 1 interpolated between them (`size_rank`, "
                         "`size_anchors`), merged into its weights at export.")


def test_grad_norms_splits_the_clipped_norm_between_the_guide_and_the_lm():
    """benchmarks/grad_norms.py on a tiny LM: at every step the norm the fit clips is the
    guide's and the LM's together (their squares add up, to float32 rounding of the clip's own
    sum), the LM's is never 0, and the guide's is exactly 0 on the steps that hold it at its start
    (no gradient reaches it) and positive once it learns."""
    from ppn_bayes import FitConfig
    from ppn_bayes.data import CharTokenizer
    from ppn_bayes.demo import embedded_text

    grad_norms = _load("grad_norms")
    text = embedded_text()[:20_000]
    tokenizer = CharTokenizer.for_text(text)
    lm = tiny_llama(tokenizer.vocab_size, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    config = FitConfig.recipe("record", steps=4, batch_size=2, seq_len=32, warmup_steps=1, mlp_group=16,
                              hold_steps=2, settle_steps=0, average_steps=0)
    rows = grad_norms.gradient_norms(lm, torch.tensor(tokenizer.encode(text)), config)
    assert len(rows) == 4
    for row in rows:
        assert row["lm"] > 0
        assert row["clipped"] == pytest.approx(math.hypot(row["guide"], row["lm"]), rel=1e-5)
    assert [row["guide"] for row in rows[:2]] == [0.0, 0.0] and all(row["guide"] > 0 for row in rows[2:])


def test_quality_and_speed_build_sub_networks_that_leave_an_idle_layer_out():
    """Masks that keep a layer with no unit: the benchmarks' sub-networks leave it out (the
    tiny Llama has no output bias), hold the masks' parameters less its norms, and give the
    masked LM's logits; the parameter check accepts that and nothing else."""
    from conftest import tiny_lm

    from ppn_bayes.core.architecture import describe
    from ppn_bayes.core.gating import GatedLM
    from ppn_bayes.core.ranking import Masks
    from ppn_bayes.deploy.subnetwork import decoder_params, subnetwork_widths

    lm = tiny_lm("llama", seed=7)
    arch = describe(lm, mlp_group=32)
    layer = torch.ones(arch.n_layers, dtype=torch.bool)
    unit = torch.ones(arch.n_layers, arch.n_units, dtype=torch.bool)
    unit[1] = False
    layer_cost, unit_cost = arch.costs(dtype=torch.int64)
    kept = int(layer_cost.sum() + unit_cost[unit].sum())
    masks = Masks(arch, layer, unit, kept / arch.total_cost, kept, arch.total_cost)
    sub, params = _load("quality")._subnetwork(lm, masks)
    assert subnetwork_widths(sub).source_layers == (0, 2)
    assert params == decoder_params(sub) == kept - int(layer_cost[1])
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    gated = GatedLM(lm, arch)
    with torch.no_grad():
        reference = gated(ids, gates=masks.gates())
        torch.testing.assert_close(sub(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)
    gated.unload()
