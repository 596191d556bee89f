"""Every random draw of a fit is a pure function of ``(seed, step)``: one named stream each.

A resumed fit therefore draws what an uninterrupted one would have, and every process
of a distributed fit draws the same sizes and gates (the streams are global, not per rank).
"""

from __future__ import annotations

import torch

__all__ = ["stream", "seed_gates"]

#: Multipliers that keep the streams of one seed apart (primes).
_STREAMS = {"sizes": 104_729, "gates": 7919, "init": 1}


def stream(name: str, seed: int, step: int) -> torch.Generator:
    """A CPU generator for the draws called ``name`` (``'sizes'``) of ``step``."""
    return torch.Generator().manual_seed(seed * _STREAMS[name] + step)


def seed_gates(seed: int, step: int) -> None:
    """Seed the global generators the Pyro sample sites draw the step's gates from."""
    torch.manual_seed(seed * _STREAMS["gates"] + step)
