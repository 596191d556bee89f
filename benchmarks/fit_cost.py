"""Fit cost: training tokens/s of the ppn_bayes fit against a plain distillation step, on one GPU.

Both train the same LM on the same batches (``TokenBlocks.batch(step, batch)`` of the
same text, seed 0) with AdamW at the fit's ``lr_lm``, gradient clipping at 1, towards a
frozen copy of the LM as teacher, in the same precision: bf16 autocast with fp32 weights
and TF32 matmuls on CUDA, float32 on the CPU.

* ``kd``: the plain distillation step a practitioner writes (shared/experiments'
  ``width_kd.py``): the teacher's logits without gradients, the student's logits, the
  full-logit KL in float32 from whole ``[B, T, V]`` log-softmaxes, one backward;
* ``ppn_bayes``: :func:`ppn_bayes.fit.fit` with the distillation objective
  (``teacher='original'``, ``nll_weight=0``, ``n_random_sizes=1``): the full LM, the
  smallest size and one random size in one pass (each on its third of the rows), the
  guide and the budget equation, the objective in chunks, the gated LM compiled
  (``--compile``, default ``inductor`` on CUDA);
* ``ppn_bayes+adapters`` (with ``--size-rank R``): the same fit with size adapters of rank
  ``R`` (:mod:`ppn_bayes.core.adapters`), measured after the plain fit in the same run.

Each loop reads its loss once a step (the fit one step late, without waiting), and
throughput counts the steps after ``--warmup``, each training token once (steps x batch x
seq_len). Records in ``fit.jsonl``: ``method`` ``kd`` and ``ppn_bayes``, with
``tokens_per_s``, ``train_tokens``, ``seconds``, ``peak_memory_gb``; the ppn_bayes record
also has ``ratio_vs_kd`` (its tokens/s over the KD step's) and ``step_cost_vs_kd`` (its
step time over the KD step's); the ppn_bayes+adapters record has ``size_rank`` and
``ratio_vs_plain`` (its tokens/s over the plain fit's). The KD step is measured first and its record written at once.

Examples::

    python3 benchmarks/fit_cost.py --model /root/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --train-text .device/b/wiki_summaries_en.txt --records-dir "$OUT/records"
    python benchmarks/fit_cost.py --quick --device cpu --size-rank 2 --records-dir /tmp/records
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_scaling import TRAIN_TEXT, prepare, steady_tokens_per_s  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def distill_step_loop(lm, teacher, blocks, *, steps: int, batch_size: int, lr: float, device: str) -> list[float]:
    """Plain distillation: KL(teacher ‖ student) from whole logits, AdamW, clipping at 1.
    Returns the step clock (seconds since the loop began, at the end of each step)."""
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    lm.train()
    times = []
    _sync(device)
    began = time.perf_counter()
    for step in range(steps):
        input_ids = blocks.batch(step, batch_size).to(device)  # [B, T]
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits  # [B, T, V]
        logits = lm(input_ids=input_ids, use_cache=False).logits  # [B, T, V]
        loss = F.kl_div(F.log_softmax(logits[:, :-1].float(), -1), F.log_softmax(teacher_logits[:, :-1].float(), -1),
                        log_target=True, reduction="none").sum(-1).mean()
        del teacher_logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        if not torch.isfinite(torch.tensor(loss.item())):  # the read syncs the device, as the fit's does
            raise FloatingPointError(f"distillation loss became non-finite at step {step}")
        times.append(time.perf_counter() - began)
    lm.eval()
    return times


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file or a Hugging Face directory (not needed with --quick)")
    p.add_argument("--model-name", help="the model's name in the records (default: from --model)")
    p.add_argument("--train-text", default=str(TRAIN_TEXT), help="training text (default: the wiki summaries)")
    p.add_argument("--steps", type=int, default=30, help="steps of each method (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the throughput (default: 5)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    p.add_argument("--compile", default=None, choices=["none", "inductor", "aot_eager", "eager"],
                   help="the fit's torch.compile backend (default: inductor on CUDA, none on the CPU)")
    p.add_argument("--mlp-group", type=int, default=64, help="intermediate channels per MLP unit (default: 64)")
    p.add_argument("--size-rank", type=int, default=0, metavar="R",
                   help="also measure the fit with size adapters of rank R (FitConfig.size_rank, the default "
                        "anchors) after the plain fit, recorded as ppn_bayes+adapters with its ratio to the plain "
                        "fit of the same run (default: 0, not measured)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to train (default: cuda)")
    p.add_argument("--work-dir", default=None,
                   help="cache of the converted model and tokens (default: a temporary folder)")
    p.add_argument("--records-dir", default="docs/benchmarks/records", help="where fit.jsonl is appended")
    p.add_argument("--time-budget", type=float, default=None,
                   help="accepted for gpu_job.sh's runner; the step counts bound the time")
    p.add_argument("--quick", action="store_true",
                   help="a tiny Llama on the embedded text, 4 steps of 4 x 32 tokens: a rehearsal")
    return p


def main(argv: list[str] | None = None) -> int:
    from ppn_bayes.core.config import FitConfig
    from ppn_bayes.data import TokenBlocks, load_tokens
    from ppn_bayes.fit import fit
    from ppn_bayes.lm import load_lm
    from ppn_bayes.records import append_record

    args = build_parser().parse_args(argv)
    if args.size_rank < 0:
        raise SystemExit(f"--size-rank must not be negative, got {args.size_rank}")
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.mlp_group = 4, 1, 4, 32, 32
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for a rehearsal")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_backend = args.compile or ("inductor" if cuda else "none")
    config = FitConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, mlp_group=args.mlp_group,
                       log_every=1, n_random_sizes=1, parallel="none", teacher="original", nll_weight=0.0,
                       distill_weight=1.0, autocast="bfloat16" if cuda else "none", compile=compile_backend)
    tokens_per_step = args.batch_size * args.seq_len
    common = dict(steps=args.steps, warmup_steps=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len,
                  train_tokens=args.steps * tokens_per_step, gpus=1 if cuda else 0, device=args.device,
                  dtype="bf16 autocast, fp32 weights, tf32" if cuda else "float32", quick=args.quick,
                  lr=config.lr_lm, grad_clip=config.grad_clip)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    with tempfile.TemporaryDirectory(prefix="fit-cost-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        lm_dir, tokens_file, name = prepare(model=args.model, train_text=args.train_text, work_dir=work,
                                            name=args.model_name, quick=args.quick)
        blocks = TokenBlocks(load_tokens(tokens_file), args.seq_len, config.seed)

        lm, _ = load_lm(lm_dir, device=args.device)
        teacher, _ = load_lm(lm_dir, device=args.device)
        teacher.requires_grad_(False).eval()
        with autocast():
            times = distill_step_loop(lm, teacher, blocks, steps=args.steps, batch_size=args.batch_size,
                                      lr=config.lr_lm, device=args.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        base, seconds = steady_tokens_per_s(times, args.warmup, tokens_per_step)
        append_record("fit", method="kd", model=name, records_dir=args.records_dir, tokens_per_s=base,
                      seconds=times[-1], timed_seconds=seconds, passes_per_step=1, peak_memory_gb=peak, **common)
        print(f"[fit_cost] kd: {base:,.0f} tokens/s, peak {peak} GB", flush=True)
        del lm, teacher

        def timed_fit(fit_config: FitConfig):
            """A fit of ``fit_config`` on a fresh copy of the LM, the GPU's memory freed and its peak
            reset first: ``(fitted, tokens/s after the warm-up, those steps' seconds, peak GB)``."""
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            fitted = fit(load_lm(lm_dir, device=args.device)[0], blocks, fit_config, progress=False)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            return (fitted, *steady_tokens_per_s(fitted.result.step_times, args.warmup, tokens_per_step), peak)

        fitted, ours, seconds, peak = timed_fit(config)
        append_record("fit", method="ppn_bayes", model=name, records_dir=args.records_dir, tokens_per_s=ours,
                      ratio_vs_kd=ours / base, step_cost_vs_kd=base / ours, seconds=fitted.result.seconds,
                      timed_seconds=seconds, passes_per_step=1, peak_memory_gb=peak,
                      loss=[row["loss"] for row in fitted.result.history], fit_config=config.to_dict(), **common)
        print(f"[fit_cost] ppn_bayes: {ours:,.0f} tokens/s, step {base / ours:.2f} x the KD step's, "
              f"peak {peak} GB", flush=True)
        if args.size_rank:
            del fitted
            adapted = dataclasses.replace(config, size_rank=args.size_rank)
            fitted, theirs, seconds, peak = timed_fit(adapted)
            append_record("fit", method="ppn_bayes+adapters", model=name, records_dir=args.records_dir,
                          tokens_per_s=theirs, ratio_vs_kd=theirs / base, ratio_vs_plain=theirs / ours,
                          size_rank=args.size_rank, seconds=fitted.result.seconds, timed_seconds=seconds,
                          passes_per_step=1, peak_memory_gb=peak, loss=[row["loss"] for row in fitted.result.history],
                          fit_config=adapted.to_dict(), **common)
            print(f"[fit_cost] ppn_bayes with size adapters of rank {args.size_rank}: {theirs:,.0f} tokens/s, "
                  f"{theirs / ours:.3f} x the plain fit's, peak {peak} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
