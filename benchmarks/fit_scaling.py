"""Fit scaling: training tokens/s of ``ppn_bayes.fit`` on 1, 2 (and 4) GPUs.

Strong scaling (the default): one global batch (``--global-batch`` sequences of
``--seq-len`` tokens) is split over ``N`` processes launched by ``torchrun`` (DDP, or
FSDP2 with ``--parallel fsdp``); ``N = 1`` is a plain single process. Every ``N`` sees the
same data, sizes and gate draws, so its loss curve must follow the one-GPU curve to
rounding; the records carry both curves and their largest difference. Under bf16 a
rounding difference can flip a straight-through gate and the curves part ways step by
step; ``--precision fp32`` (float32, no TF32) is the setting in which to compare them.

Weak scaling (``--weak``): every process keeps ``--global-batch`` sequences, so ``N``
processes train ``N`` times the tokens per step: the throughput a user gets by adding GPUs
to a fit whose batch fits one GPU. Its loss curve is compared (``--match-curves``) with one
process that accumulates ``N`` micro-batches of ``--global-batch`` (``FitConfig.accumulate``):
the same global batch, sizes and gate draws, so the same steps up to rounding; the record
carries that reference's curve and throughput too.

With ``--reuse`` a process count measured before under the same settings (its result is
kept in ``--work-dir``) is read back instead of run again: one GPU can be measured while
the other is busy, and two GPUs later against it.

Throughput is measured after ``--warmup`` steps, from the fit's own step clock
(``FitResult.step_times``: when each step's losses came back from the device; the loop
reads them one step late, so the host queues the next step meanwhile). ``tokens_per_s``
counts each training token once (steps x global batch x seq_len), although a step runs
three passes over it (the full LM, the smallest size, one random size). On CUDA the fit runs under bf16 autocast with fp32 weights and TF32
matmuls; on the CPU in float32.

One record per ``N`` in ``fit.jsonl``, appended as soon as ``N`` is measured:
``gpus``, ``tokens_per_s``, ``tokens_per_s_per_gpu``, ``speedup_vs_1gpu``,
``scaling_efficiency`` (speedup / N), ``loss`` and ``nll_full`` (per step),
``max_loss_diff_vs_1gpu`` and the other figures of :func:`curve_match`, ``train_tokens``, ``seconds``, the settings.

Examples::

    # the H200 machine (the model and the wiki summaries staged by ../shared/tools/device-stage)
    python3 benchmarks/fit_scaling.py --model /root/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --train-text .device/b/wiki_summaries_en.txt --gpus 1 2 --records-dir "$OUT/records"
    # a CPU rehearsal with a tiny model and gloo
    python benchmarks/fit_scaling.py --quick --device cpu --records-dir /tmp/records
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TRAIN_TEXT = SHARED / "data" / "wiki-summaries" / "wiki_summaries_en.txt"
# NVLink multicast stays off on the shared H200 hosts, in every process started here.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# -- inputs: a Hugging Face directory and a token file, cached as benchmarks/quality.py does ----
def prepare(*, model: str | None, train_text: str, work_dir: Path, name: str | None, quick: bool):
    """``(lm_dir, tokens_file, model_name)``: the LM as a plain HF directory and the training
    text as tokens, cached under ``work_dir`` (GGUF conversion takes about a minute)."""
    from ppn_bayes.data import CharTokenizer, embedded_text, load_tokens, save_tokens, tokenize
    from ppn_bayes.lm import load_lm, save_lm, tiny_llama

    if quick:
        text = embedded_text()
        tokenizer = CharTokenizer.for_text(text)
        lm_dir = work_dir / "tiny-model"
        if not (lm_dir / "config.json").is_file():
            save_lm(tiny_llama(tokenizer.vocab_size, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128),
                    tokenizer, lm_dir, overwrite=True)
        tokens_file = work_dir / "tokens" / "tiny-embedded.safetensors"
        if not tokens_file.is_file():
            save_tokens(tokens_file, tokenize(text, tokenizer))
        return lm_dir, tokens_file, "tiny-llama (quick)"
    if model is None:
        raise SystemExit("--model is needed (a .gguf file or a Hugging Face directory), or --quick")
    path = Path(model)
    name = name or path.name.split(".")[0]
    lm_dir = work_dir / "model" if path.suffix == ".gguf" else path
    tokenizer = None
    if not (lm_dir / "config.json").is_file():
        lm, tokenizer = load_lm(path)
        save_lm(lm, tokenizer, lm_dir, overwrite=True)
    tokens_file = work_dir / "tokens" / f"{name}-{Path(train_text).stem}.safetensors"
    if not tokens_file.is_file():
        if tokenizer is None:
            from ppn_bayes.lm import load_tokenizer

            tokenizer = load_tokenizer(lm_dir)
        save_tokens(tokens_file, load_tokens(train_text, tokenizer))
    return lm_dir, tokens_file, name


def steady_tokens_per_s(step_times: list[float], warmup: int, tokens_per_step: int) -> tuple[float, float]:
    """``(tokens/s, seconds)`` over the steps after the first ``warmup`` (all when too few)."""
    if len(step_times) <= warmup or warmup < 1:
        return len(step_times) * tokens_per_step / step_times[-1], step_times[-1]
    seconds = step_times[-1] - step_times[warmup - 1]
    return (len(step_times) - warmup) * tokens_per_step / seconds, seconds


# -- one fit, in each process of a torchrun launch (or alone for one GPU) ---------------------
def worker(args: argparse.Namespace) -> None:
    """Fit for ``--steps`` steps and (rank 0) write the result as JSON to ``--result``."""
    import contextlib

    from ppn_bayes import distributed
    from ppn_bayes.core.config import FitConfig
    from ppn_bayes.data import load_tokens
    from ppn_bayes.fit import fit
    from ppn_bayes.io import atomic_write_text
    from ppn_bayes.lm import load_lm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.weak:
        args.global_batch *= world
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} processes")
    cuda = args.device == "cuda"
    bf16 = cuda and args.precision == "bf16"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = bf16
        torch.backends.cudnn.allow_tf32 = bf16
    # Under torchrun the LM is read on the CPU and fit moves it to cuda:LOCAL_RANK.
    lm, _ = load_lm(args.lm_dir, device="cpu" if world > 1 or not cuda else "cuda")
    tokens = load_tokens(args.tokens)
    config = FitConfig(steps=args.steps, batch_size=args.global_batch // world, accumulate=args.accumulate,
                       seq_len=args.seq_len,
                       mlp_group=args.mlp_group, log_every=1, parallel=args.parallel if world > 1 else "none")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        fitted = fit(lm, tokens, config, progress=False)
    if distributed.is_main_process():
        result = fitted.result.to_dict()
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        atomic_write_text(Path(args.result), json.dumps(result))


def result_path(n: int, args: argparse.Namespace, directory: Path) -> Path:
    """Where the result of ``n`` processes under these settings is kept (``--reuse`` reads it;
    one process is the same run in weak and strong scaling)."""
    key = (f"n{n}-b{args.global_batch}-a{args.accumulate}-t{args.seq_len}-s{args.steps}-g{args.mlp_group}-"
           f"{args.precision}-{args.parallel}-{args.device}" + ("-weak" if args.weak and n > 1 else ""))
    return directory / f"result-{key}.json"


def launch(n: int, args: argparse.Namespace, lm_dir: Path, tokens_file: Path, result: Path) -> dict | None:
    """Run the worker on ``n`` processes; its result, or ``None`` when it failed or ran out of time."""
    worker_args = [str(Path(__file__).resolve()), "--worker", "--lm-dir", str(lm_dir), "--tokens", str(tokens_file),
                   "--result", str(result), "--steps", str(args.steps), "--global-batch", str(args.global_batch),
                   "--seq-len", str(args.seq_len), "--mlp-group", str(args.mlp_group), "--device", args.device,
                   "--parallel", args.parallel, "--precision", args.precision, "--accumulate", str(args.accumulate),
                   *(["--weak"] if args.weak else [])]
    if n == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   *worker_args]
    env = {**os.environ, **SAFE_ENV, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    began = time.perf_counter()
    try:
        run = subprocess.run(command, env=env, timeout=args.timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"[fit_scaling] {n} process(es): no result within {args.timeout} s", file=sys.stderr)
        return None
    if run.returncode != 0 or not result.is_file():
        print(f"[fit_scaling] {n} process(es) failed (exit {run.returncode}):\n{run.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"[fit_scaling] {n} process(es): {time.perf_counter() - began:.0f} s in all", file=sys.stderr)
    return json.loads(result.read_text())


def record(n: int, result: dict, one: dict | None, args: argparse.Namespace, model_name: str,
           reference: dict | None = None) -> dict:
    """The ``fit.jsonl`` record of ``n`` processes (``one``: the one-process result, if measured;
    ``reference``: one process that accumulated ``n`` micro-batches, the same global batch)."""
    from ppn_bayes.records import append_record, curve_match

    global_batch = args.global_batch * (n if args.weak else 1)
    tokens_per_step = global_batch * args.seq_len
    tps, seconds = steady_tokens_per_s(result["step_times"], args.warmup, tokens_per_step)
    figures = dict(
        gpus=n if args.device == "cuda" else 0, processes=n, parallel=result["parallel"],
        tokens_per_s=tps, tokens_per_s_per_gpu=tps / n, timed_steps=len(result["step_times"]) - args.warmup,
        timed_seconds=seconds, warmup_steps=args.warmup, steps=args.steps, global_batch=global_batch,
        batch_per_gpu=global_batch // n, scaling="weak" if args.weak else "strong", seq_len=args.seq_len,
        train_tokens=result["train_tokens"],
        seconds=result["seconds"], loss=[row["loss"] for row in result["history"]],
        nll_full=[row["nll_full"] for row in result["history"]], peak_memory_gb=result.get("peak_memory_gb"),
        dtype="bf16 autocast, fp32 weights, tf32" if args.device == "cuda" and args.precision == "bf16"
        else "float32",
        device=args.device, quick=args.quick, fit_config=result["config"],
    )
    if one is not None:  # one GPU's batch: args.global_batch in both modes
        one_tps, _ = steady_tokens_per_s(one["step_times"], args.warmup, args.global_batch * args.seq_len)
        figures["speedup_vs_1gpu"] = tps / one_tps
        figures["scaling_efficiency"] = tps / one_tps / n
    if reference is not None:  # weak scaling: the curve of the same global batch on one GPU
        ref_tps, _ = steady_tokens_per_s(reference["step_times"], args.warmup, tokens_per_step)
        figures.update(reference_tokens_per_s=ref_tps, reference_accumulate=n,
                       reference_loss=[row["loss"] for row in reference["history"]],
                       **curve_match([row["loss"] for row in result["history"]],
                                     [row["loss"] for row in reference["history"]]))
    if one is not None and not args.weak and n > 1:  # weak scaling: the curves differ by design
        figures.update(curve_match([row["loss"] for row in result["history"]],
                                   [row["loss"] for row in one["history"]]))
        figures["max_nll_full_diff_vs_1gpu"] = max(
            abs(a["nll_full"] - b["nll_full"]) for a, b in zip(result["history"], one["history"]))
    return append_record("fit", method="ppn_bayes", model=model_name, records_dir=args.records_dir, **figures)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file or a Hugging Face directory (not needed with --quick)")
    p.add_argument("--model-name", help="the model's name in the records (default: from --model)")
    p.add_argument("--train-text", default=str(TRAIN_TEXT), help="training text (default: the wiki summaries)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4],
                   help="process counts to measure; counts above the GPUs present are skipped (default: 1 2 4)")
    p.add_argument("--steps", type=int, default=30, help="fit steps per process count (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the throughput (default: 5)")
    p.add_argument("--global-batch", type=int, default=16,
                   help="sequences per step over all processes (default: 16)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--weak", action="store_true",
                   help="weak scaling: --global-batch sequences per process, not split over the processes")
    p.add_argument("--match-curves", action="store_true",
                   help="weak scaling: also fit one process that accumulates N micro-batches (the global batch "
                        "of N processes) and compare the N-process loss curve with its curve")
    p.add_argument("--accumulate", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="CUDA: bf16 autocast with TF32 (default) or float32 without TF32 (to compare curves)")
    p.add_argument("--mlp-group", type=int, default=64, help="intermediate channels per MLP unit (default: 64)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="engine for several processes (default: ddp)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (NCCL) or cpu (gloo)")
    p.add_argument("--timeout", type=int, default=300, help="seconds allowed per process count (default: 300)")
    p.add_argument("--work-dir", default=None,
                   help="cache of the converted model and tokens (default: a temporary folder)")
    p.add_argument("--records-dir", default="docs/benchmarks/records", help="where fit.jsonl is appended")
    p.add_argument("--reuse", action="store_true",
                   help="take a process count's result from --work-dir when the same settings were measured "
                        "there before (no new record for it): measure one GPU while the other is busy, then two")
    p.add_argument("--quick", action="store_true",
                   help="a tiny Llama on the embedded text, 4 steps of 4 x 32 tokens: a rehearsal")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lm-dir", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.steps, args.warmup, args.global_batch, args.seq_len, args.mlp_group = 4, 1, 4, 32, 32
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (gloo) for a rehearsal")
    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    counts = [n for n in args.gpus if n <= available and (args.weak or args.global_batch % n == 0)]
    for n in sorted(set(args.gpus) - set(counts)):
        print(f"[fit_scaling] skipping {n}: {available} devices, global batch {args.global_batch}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fit-scaling-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        lm_dir, tokens_file, name = prepare(model=args.model, train_text=args.train_text, work_dir=work,
                                            name=args.model_name, quick=args.quick)
        results = work / "results"
        results.mkdir(parents=True, exist_ok=True)

        def obtain(n: int, run_args: argparse.Namespace) -> tuple[dict | None, bool]:
            """``(result, reused)``: read back with --reuse when measured before, else run."""
            kept = result_path(n, run_args, results)
            if run_args.reuse and kept.is_file():
                print(f"[fit_scaling] {n} process(es): the result measured before, {kept}", file=sys.stderr)
                return json.loads(kept.read_text()), True
            kept.unlink(missing_ok=True)
            return launch(n, run_args, lm_dir, tokens_file, kept), False

        one = None
        for n in sorted(counts):
            result, reused = obtain(n, args)
            if result is None:
                continue
            if n == 1:
                one = result
            if reused:
                continue
            reference = None
            if args.weak and args.match_curves and n > 1:
                reference, _ = obtain(1, argparse.Namespace(**{**vars(args), "accumulate": n}))
            rec = record(n, result, one, args, name, reference)
            print(json.dumps({k: rec.get(k) for k in ("processes", "tokens_per_s", "scaling_efficiency",
                                                       "max_loss_diff_vs_1gpu")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
