"""Learning-rate schedules shared by the fit and the distillation fine-tune.

A schedule is a factor on each optimizer group's base rate, a pure function of the step,
so a run resumed at any step follows the one that never stopped.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "COSINE_FLOOR", "check_schedule", "lr_factor"]

#: ``constant``: the base rate throughout. ``cosine``: a linear warm-up over
#: ``warmup_steps``, then a half cosine from the base rate down to ``COSINE_FLOOR`` times it
#: at the last step (the schedule of the reference distillation, shared/experiments).
SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.1


def check_schedule(schedule: str) -> str:
    """``schedule``, or ``ValueError`` naming the known schedules."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    return schedule


def lr_factor(schedule: str, step: int, steps: int, warmup_steps: int = 0) -> float:
    """The factor on the base rate at ``step`` (0-based) of a run of ``steps`` steps.

    Both schedules warm up linearly over the first ``warmup_steps`` steps (step ``s`` reads
    ``(s + 1) / warmup_steps``); ``cosine`` then decays as ``floor + (1 - floor) ·
    (1 + cos(π s / steps)) / 2``, reaching ``COSINE_FLOOR`` at ``s = steps``."""
    check_schedule(schedule)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    progress = min(step, steps) / steps
    return warm * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
