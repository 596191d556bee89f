"""Benchmark records: one JSON line per measured configuration.

Every benchmark appends to ``docs/benchmarks/records/<benchmark>.jsonl`` through
:func:`append_record`, which adds what BENCHMARKS.md asks of every record (versions,
machine, command, date). Tables and plots are generated from these files, never typed.
This module imports neither pyro nor arviz, so it runs on the GPU machine as well.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["append_record", "read_records", "machine", "curve_match", "RECORDS_DIR", "BENCHMARKS"]

RECORDS_DIR = Path("docs/benchmarks/records")
BENCHMARKS = ("quality", "speed", "speculative", "resize", "fit", "recipes", "teacher", "token_nll", "settle")


def machine() -> str:
    """``'h200: NVIDIA H200'``-style name of the accelerator in use, else ``'cpu: ...'``."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            kind = "h200" if "H200" in name else "cuda"
            count = torch.cuda.device_count()
            return f"{kind}: {name}" + (f" x{count}" if count > 1 else "")
    except ImportError:  # pragma: no cover
        pass
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "pyro", "ppn_bayes"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            found[name] = None
    return found


def append_record(benchmark: str, *, method: str, model: str, records_dir: str | Path = RECORDS_DIR,
                  command: str | None = None, **figures) -> dict:
    """Append one record to ``<records_dir>/<benchmark>.jsonl`` and return it.

    ``figures`` are the measured values under their own names (``ppl``, ``tokens_per_s``,
    ``size_requested``, ``size_reached``, ...).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    record = {
        "benchmark": benchmark,
        "method": method,
        "model": model,
        **figures,
        "machine": figures.get("machine") or machine(),
        "versions": _versions(),
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(records_dir) / f"{benchmark}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # one write per line: a crash leaves whole lines only
        handle.write(json.dumps(record, default=str) + "\n")
    return record


def read_records(benchmark: str, records_dir: str | Path = RECORDS_DIR) -> list[dict]:
    """All records of ``benchmark`` (an empty list when none were written)."""
    path = Path(records_dir) / f"{benchmark}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_match(loss: list[float], one: list[float], tol: float = 1e-3) -> dict:
    """How closely the loss curve of ``N`` processes follows the one-process curve.

    ``max_loss_diff_vs_1gpu``: the largest difference at any step. ``steps_within_1e-3``: the
    leading steps that agree within ``tol`` (a straight-through gate that flips under a
    different summation order ends the exact agreement; from there the single-draw ELBO
    estimates differ step by step). ``mean_loss_diff_last_half``: the difference of the two
    curves' means over the second half of the steps, and ``loss_diff_se``: its standard
    error from the step-to-step scatter of the differences; the curves agree in the mean
    when ``|mean_loss_diff_last_half| <= 2 loss_diff_se``."""
    diffs = [a - b for a, b in zip(loss, one)]
    leading = next((i for i, d in enumerate(diffs) if abs(d) > tol), len(diffs))
    half = diffs[len(diffs) // 2:]
    mean = sum(half) / len(half)
    spread = (sum((d - mean) ** 2 for d in half) / max(len(half) - 1, 1)) ** 0.5
    se = spread / len(half) ** 0.5
    return {"max_loss_diff_vs_1gpu": max(abs(d) for d in diffs), "steps_within_1e-3": leading,
            "mean_loss_diff_last_half": mean, "loss_diff_se": se,
            "curves_agree_in_mean": abs(mean) <= 2 * se}
