"""Resizing benchmark: wall time and peak resident memory of cutting SmolLM2-135M to each
size from a ranked checkpoint, against loading the full model once.

    python benchmarks/resize.py [--model GGUF_OR_DIR] [--sizes 0.9 0.7 0.5 0.4 0.3]
                                [--records-dir docs/benchmarks/records] [--work DIR]

Steps (CPU, fp32, warm page cache):

1. load the LM, rank its units and write a ranked checkpoint (``export_ranked``) and a
   plain Hugging Face copy of the full model (the baseline loads that);
2. for each size, in a fresh Python process: ``resize(ranked, size, out)``; the child
   imports torch, transformers' classes of the model and ppn_bayes before the clock
   starts, and reports the seconds of the call, its peak RSS (``VmHWM``), its RSS after
   the imports, and the bytes it read from ``ranked.safetensors``;
3. the same for ``AutoModelForCausalLM.from_pretrained(full)`` and for the naive path
   (load the full model, ``build_subnetwork`` at 0.5, save it);
4. one record per measurement in ``<records-dir>/resize.jsonl``.

The ranking comes from random log-scales (an unfitted guide): what a resize reads and
costs depends on the sizes, not on the quality of the fit. Each record says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import PROTOCOL_SIZES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RANKING_NOTE = "random log-lambdas (unfitted guide, seed 0): resize cost does not depend on fit quality"


def _rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (``VmHWM``), in MB.

    Not ``getrusage(...).ru_maxrss``: Linux carries that over from the parent across
    fork and exec, so a child would report at least the parent's size at the fork.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_imports(model_type: str, threads: int) -> float:
    """Import what every child needs (torch, transformers' classes for the model,
    ppn_bayes) before the clock starts, so children compare work, not imports; returns
    the RSS after them."""
    import importlib

    import torch
    import transformers  # noqa: F401

    import ppn_bayes  # noqa: F401

    torch.set_num_threads(threads)
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    importlib.import_module(f"transformers.models.{model_type}.configuration_{model_type}")
    return _rss_mb()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- children: one measurement each, in a fresh process ----------------------------------------
def child_resize(args) -> dict:
    """Resize the ranked checkpoint to ``args.size``; time, memory and bytes read."""
    from ppn_bayes.deploy.resize import resize

    import_rss = _warm_imports(args.model_type, args.threads)
    began = time.perf_counter()
    result = resize(args.ranked, args.size, args.out, overwrite=True)
    seconds = time.perf_counter() - began
    return {**result.to_dict(), "seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "import_rss_mb": import_rss,
            "out_bytes": _dir_bytes(Path(args.out))}


def child_full_load(args) -> dict:
    """Load the full model with ``from_pretrained``: the baseline.

    ``from_pretrained`` memory-maps the file, so right after it the weights are not yet
    resident (``lazy_seconds``, ``lazy_peak_rss_mb``); they are once the model is used.
    The figures compared (``seconds``, ``peak_rss_mb``) are taken after every weight has
    been read once, as a first forward pass would.
    """
    import torch
    from transformers import AutoModelForCausalLM

    import_rss = _warm_imports(args.model_type, args.threads)
    began = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(args.full, dtype=torch.float32)
    seconds = time.perf_counter() - began
    lazy_peak = _peak_rss_mb()
    with torch.no_grad():
        checksum = sum(float(p.sum()) for p in lm.parameters())  # reads every page, no copy
    touched = time.perf_counter() - began
    n = sum(p.numel() for p in lm.parameters())
    return {"seconds": touched, "lazy_seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
            "lazy_peak_rss_mb": lazy_peak, "import_rss_mb": import_rss, "params": n, "weights_sum": checksum,
            "checkpoint_bytes": (Path(args.full) / "model.safetensors").stat().st_size}


def child_load_then_slice(args) -> dict:
    """The naive path: load the full model, apply the mask file, slice, save."""
    import torch
    from transformers import AutoModelForCausalLM

    from ppn_bayes.deploy.maskfile import load_masks
    from ppn_bayes.deploy.subnetwork import build_subnetwork, save_subnetwork

    import_rss = _warm_imports(args.model_type, args.threads)
    began = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(args.full, dtype=torch.float32)
    masks = load_masks(args.masks, lm).masks_for(args.size)
    sub = build_subnetwork(lm, masks)
    save_subnetwork(sub, None, args.out, overwrite=True)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "import_rss_mb": import_rss,
            "size_requested": masks.size_requested, "size_reached": masks.size_reached,
            "kept_params": masks.kept_params, "total_params": masks.total_params,
            "checkpoint_bytes": (Path(args.full) / "model.safetensors").stat().st_size}


CHILDREN = {"resize": child_resize, "full-load": child_full_load, "load-then-slice": child_load_then_slice}


def run_child(kind: str, threads: int, **options) -> dict:
    """Run one measurement in a fresh Python process and return its figures."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--threads", str(threads)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_wall_s"] = wall
    return figures


# -- the parent ------------------------------------------------------------------------------
def prepare(model: str, work: Path, mlp_group: int) -> dict:
    """Load the LM, rank it (random log-scales) and write the ranked checkpoint, a plain
    copy of the full model and a mask file at size 0.5 into ``work``."""
    import torch

    from ppn_bayes.core.architecture import describe
    from ppn_bayes.lm import load_lm, save_lm
    from ppn_bayes.deploy.maskfile import save_masks
    from ppn_bayes.core.ranking import Ranking
    from ppn_bayes.deploy.resize import export_ranked

    lm, tokenizer = load_lm(model)
    arch = describe(lm, mlp_group=mlp_group)
    generator = torch.Generator().manual_seed(0)
    ranking = Ranking.from_log_lambda(arch, torch.randn(arch.n_layers, generator=generator),
                                      torch.randn(arch.n_layers, arch.n_units, generator=generator))
    began = time.perf_counter()
    export_ranked(lm, work / "ranked", ranking=ranking, tokenizer=tokenizer, overwrite=True)
    export_seconds = time.perf_counter() - began
    save_lm(lm, tokenizer, work / "full", overwrite=True)
    save_masks(work / "masks.json", ranking, sizes=[0.5], lm=lm, overwrite=True)
    return {"export_seconds": export_seconds, "total_params": arch.total_cost, "outside_params": arch.outside_cost,
            "mlp_group": mlp_group, "model_type": arch.model_type}


def main(argv=None) -> int:
    """Run the benchmark (or, with the internal ``--child``, one measurement)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: ../shared/tools/smollm2)")
    parser.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="the model's name in the records")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(PROTOCOL_SIZES),
                        help=f"sizes to cut (default: {' '.join(f'{s:g}' for s in PROTOCOL_SIZES)})")
    parser.add_argument("--mlp-group", type=int, default=64, help="intermediate channels per MLP unit")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--records-dir", default=str(ROOT / "docs/benchmarks/records"), help="where resize.jsonl goes")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    # Child mode (internal).
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name in ("ranked", "full", "out", "masks", "model-type"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0

    import torch

    from ppn_bayes.records import append_record

    torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        tool = ROOT.parent / "shared" / "tools" / "smollm2"
        model = subprocess.run([str(tool)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/resize.py", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="ppn-resize-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup = prepare(model, work, args.mlp_group)
        model_type = setup["model_type"]
        common = dict(model=args.model_name, records_dir=args.records_dir, command=command, dtype="float32",
                      threads=args.threads, page_cache="warm", ranking=RANKING_NOTE, **setup)
        full = run_child("full-load", args.threads, full=work / "full", model_type=model_type)
        append_record("resize", method="full_load", size_requested=1.0, size_reached=1.0,
                      bytes_read=full["checkpoint_bytes"], **{**full, **common})
        print(json.dumps({"full_load": full}))
        naive = run_child("load-then-slice", args.threads, full=work / "full", masks=work / "masks.json",
                          out=work / "naive", size=0.5, model_type=model_type)
        append_record("resize", method="full_load_then_slice", **{**naive, **common})
        print(json.dumps({"load_then_slice": naive}))
        for size in args.sizes:
            figures = run_child("resize", args.threads, ranked=work / "ranked", size=size, out=work / f"sub-{size}",
                                model_type=model_type)
            figures["read_fraction"] = figures["bytes_read"] / figures["checkpoint_bytes"]
            figures["peak_rss_vs_full_load"] = figures["peak_rss_mb"] / full["peak_rss_mb"]
            figures.pop("out", None)
            append_record("resize", method="ppn_bayes", **{**figures, **common})
            print(json.dumps({"resize": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
