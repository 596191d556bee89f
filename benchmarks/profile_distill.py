"""Where a distillation step's time goes (width-kd and ``ppn-bayes distill``): wall time per
step against the device's busy time, with the objective's chunks compiled or eager.

    python3 benchmarks/profile_distill.py [--lm-dir DIR] [--size 0.5 --batch 16 --seq-len 1024]

The student is the uniform width cut of ``--size`` of the LM (random unit scores: the cut's
shape, not its quality, sets the speed); the teacher is the LM. Without ``--lm-dir`` the LM is
a randomly initialised Llama of SmolLM2-135M's shape (no files needed), and the tokens are
random. For each ``--objective`` (``as-configured``: what :func:`ppn_bayes.deploy.finetune.distill`
does; ``eager``: the objective's chunks uncompiled, as before the fix of 2 December 2026) it runs
``--warmup`` steps (compiling), then ``--steps`` steps timed plainly and the same steps under
``torch.profiler``, and prints the wall time per step (plain and profiled), the GPU's kernel
time per step and the kernels that took the most of it. A diagnostic for the developers (no
record): width-kd's throughput of record is in its quality records (``finetune_tokens_per_s``).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch


def smollm2_shaped(seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of SmolLM2-135M's shape."""
    from ppn_bayes.lm import tiny_llama

    return tiny_llama(49152, layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, seed=seed)


def _eager(objective, *args, **kwargs):
    """``objective`` with its chunks uncompiled, whatever ``compile`` the caller passes."""
    return objective(*args, **{**kwargs, "compile": "none"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-dir", help="a Hugging Face LM directory (default: SmolLM2-135M's shape, random weights)")
    p.add_argument("--size", type=float, default=0.5, help="the student's size (default: 0.5)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--steps", type=int, default=10, help="steps profiled after the warm-up (default: 10)")
    p.add_argument("--warmup", type=int, default=5, help="steps before profiling, compiling (default: 5)")
    p.add_argument("--compile", default="inductor" if torch.cuda.is_available() else "none",
                   help="DistillConfig.compile (default: inductor on CUDA, none on the CPU)")
    p.add_argument("--objective", default="as-configured,eager",
                   help="comma-separated: as-configured, eager (default: both)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    objectives = args.objective.split(",")
    for name in objectives:
        if name not in ("as-configured", "eager"):
            p.error(f"--objective: {name!r} is neither as-configured nor eager")

    from torch.profiler import ProfilerActivity, profile

    from ppn_bayes.core.architecture import describe
    from ppn_bayes.core.objective import fused_objective
    from ppn_bayes.deploy import finetune
    from ppn_bayes.deploy.subnetwork import build_subnetwork
    from ppn_bayes.inspect.baselines import uniform_cut_for_size
    from ppn_bayes.lm import load_lm

    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.lm_dir:
        lm, _ = load_lm(args.lm_dir, device=args.device)
    else:
        lm = smollm2_shaped().to(args.device)
    lm.float().eval()
    arch = describe(lm)
    scores = torch.rand(arch.n_layers, arch.n_units, generator=torch.Generator().manual_seed(0))
    masks = uniform_cut_for_size(arch, scores, args.size)
    vocab = lm.get_output_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (args.batch * args.seq_len * (args.warmup + args.steps + 1),),
                           generator=torch.Generator().manual_seed(1))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    original = finetune.fused_objective
    print(f"student: size {masks.size_reached:.3f} of {arch.n_layers} layers; batch {args.batch} x {args.seq_len}; "
          f"compile {args.compile}; {args.device}", flush=True)
    for name in objectives:
        student = build_subnetwork(lm, masks).to(args.device).float()
        config = finetune.DistillConfig(steps=args.warmup, batch_size=args.batch, seq_len=args.seq_len, lr=1e-4,
                                        compile=args.compile, log_every=10**6)
        if name == "eager":
            finetune.fused_objective = functools.partial(_eager, fused_objective)
        try:
            began = time.perf_counter()
            finetune.distill(student, lm, tokens, config, autocast=autocast, progress=False)
            if cuda:
                torch.cuda.synchronize()
            compiled = time.perf_counter() - began
            config = config.replace(steps=args.steps)
            plain = finetune.distill(student, lm, tokens, config, autocast=autocast, progress=False).seconds
            with profile(activities=activities) as prof:
                began = time.perf_counter()
                finetune.distill(student, lm, tokens, config, autocast=autocast, progress=False)
                if cuda:
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - began) / args.steps
        finally:
            finetune.fused_objective = original
        events = prof.key_averages()
        tokens_per_step = args.batch * args.seq_len
        step = plain / args.steps
        print(f"\n== objective {name}: warm-up {compiled:.1f} s; {step:.4f} s a step ({tokens_per_step / step:,.0f} "
              f"tokens/s), {wall:.4f} s under the profiler", flush=True)
        if cuda:
            busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6 / args.steps
            launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")) / args.steps
            print(f"GPU kernel time per step {busy:.4f} s; kernel launches per step {launches:.0f}")
            print(events.table(sort_by="self_cuda_time_total", row_limit=12))
        else:
            print(events.table(sort_by="self_cpu_time_total", row_limit=12))
        del student
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
