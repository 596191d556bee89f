"""Copies between the host and a device that do not hold the host up.

A training step queues its kernels and returns; the host then prepares the next step while
the device runs this one, unless a copy makes it wait. :func:`to_device` sends a batch
from page-locked memory (a copy from pageable memory first waits for every kernel already
queued), and :class:`Readback` brings a step's few figures back by a copy the device makes
on its own, read when they are wanted, a step or more later.
"""

from __future__ import annotations

import torch

__all__ = ["Readback", "to_device"]


def to_device(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``batch`` (on the host) on ``device``: to a GPU through page-locked memory, queued
    behind the device's work, so the host goes on at once."""
    device = torch.device(device)
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


class Readback:
    """``values`` (a small tensor) copied to the host behind the work that computes them;
    :meth:`tolist` waits for that copy alone (an event marks it done)."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def tolist(self) -> list:
        """The values, as Python numbers."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
