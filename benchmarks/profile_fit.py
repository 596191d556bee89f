"""Where a fit step's time goes: wall time per step against the device's busy time.

    python3 benchmarks/profile_fit.py --lm-dir DIR --tokens FILE [--batch 16 --seq-len 1024]

Runs ``ppn_bayes.fit`` for ``--steps`` steps under ``torch.profiler`` (the first
``--warmup`` left out of the wall time) and prints the wall time per step, the time the
GPU spent in kernels per step (against the wall time of fit_scaling.py at the same batch:
a step bound by the host shows a GPU far from busy), the kernel launches per step and the
operators that took the most host time. A diagnostic for the developers (no record): the figures
of record come from benchmarks/fit_scaling.py. ``DIR`` and ``FILE`` are what
fit_scaling.py caches under its ``--work-dir`` (``model/`` and ``tokens/``).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-dir", required=True, help="a Hugging Face LM directory")
    p.add_argument("--tokens", required=True, help="a safetensors token file (key 'tokens')")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--steps", type=int, default=8, help="steps profiled after the warm-up (default: 8)")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (default: 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from ppn_bayes.core.config import FitConfig
    from ppn_bayes.data import load_tokens
    from ppn_bayes.fit import fit
    from ppn_bayes.lm import load_lm

    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    lm, _ = load_lm(args.lm_dir, device=args.device)
    tokens = load_tokens(args.tokens)
    config = FitConfig(steps=args.warmup + args.steps, batch_size=args.batch, seq_len=args.seq_len, log_every=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    began = time.perf_counter()
    with profile(activities=activities) as prof, autocast:
        fitted = fit(lm, tokens, config, progress=False)
    wall = fitted.result.step_times
    per_step = (wall[-1] - wall[args.warmup - 1]) / args.steps
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") if cuda else 0.0
    steps = args.warmup + args.steps
    print(f"{steps} steps of {args.batch} x {args.seq_len} in {time.perf_counter() - began:.1f} s; "
          f"steady wall per step {per_step:.3f} s (slower under the profiler: compare fit_scaling.py's)")
    if cuda:
        busy = device_us / 1e6 / steps
        print(f"GPU kernel time per step (mean over all steps) {busy:.3f} s")
        print(events.table(sort_by="self_cuda_time_total", row_limit=15))
    launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")) / steps if cuda else 0
    print(f"kernel launches per step {launches:.0f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
