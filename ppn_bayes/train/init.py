"""How a fit starts (``FitConfig.init``).

``neutral``: every unit location ``log λ_lu`` of the guide starts at 0 (plus
``init_jitter``), so the first masks are as good as a random cut. ``activation``: the LM's
MLP channels are first put in order of their mean |activation| on the first training
windows (:func:`~ppn_bayes.inspect.baselines.order_mlp_channels`; the LM computes the same
function, and a unit of ``g`` consecutive channels then holds channels of like
activation), and the unit locations start spread by each unit's activation rank within
its layer and kind (KV groups, MLP channel groups), from ``+ACTIVATION_SPREAD`` for the
most activated to ``-ACTIVATION_SPREAD`` for the least. Layers start alike, so the
longest prefix at a size keeps about the same fraction of every layer's units: the first
masks are close to the uniform activation cut (the width baselines' start), and the fit
moves them from there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.architecture import Architecture
from ..inspect.baselines import activation_column_scores, order_mlp_channels, unit_scores_from_columns

__all__ = ["ACTIVATION_SPREAD", "CALIBRATION_WINDOWS", "activation_start", "rank_locations"]

#: The unit locations of ``init='activation'`` span ``[-ACTIVATION_SPREAD, +ACTIVATION_SPREAD]``
#: in ``log λ``: with the default posterior scale 0.1, neighbouring MLP units of SmolLM2
#: (24 a layer, 0.087 apart) may swap in a draw, KV groups (3 a layer, 1.0 apart) do not.
ACTIVATION_SPREAD = 1.0
#: Windows of the training text read for the activation statistics (the rows of step 0).
CALIBRATION_WINDOWS = 16


def rank_locations(arch: Architecture, scores: torch.Tensor, spread: float = ACTIVATION_SPREAD) -> torch.Tensor:
    """``[L, U]`` locations from unit ``scores [L, U]``: within each layer and kind, the
    ``n`` units ranked by score (ties by index) sit evenly from ``+spread`` (rank 0) to
    ``-spread`` (rank ``n - 1``); a kind with one unit per layer sits at 0."""
    if tuple(scores.shape) != (arch.n_layers, arch.n_units):
        raise ValueError(f"unit scores of shape {tuple(scores.shape)}, expected {(arch.n_layers, arch.n_units)}")
    locations = torch.zeros(arch.n_layers, arch.n_units, dtype=torch.float64)
    A = arch.n_attention_units
    for kind in (slice(0, A), slice(A, arch.n_units)):
        part = scores[:, kind].double()  # [L, n]
        n = part.shape[1]
        if n < 2:
            continue
        order = part.argsort(dim=1, descending=True, stable=True)  # [L, n] unit of each rank
        rank = order.argsort(dim=1).double()  # [L, n] rank of each unit
        locations[:, kind] = spread * (1 - 2 * rank / (n - 1))
    return locations


@torch.no_grad()
def activation_start(lm: nn.Module, arch: Architecture, blocks, batch_size: int = 8) -> torch.Tensor:
    """Put ``lm``'s MLP channels in order of activation on the first ``CALIBRATION_WINDOWS``
    training windows of ``blocks`` (in place, the same function) and return the unit
    locations ``[L, U]`` their ranks give (:func:`rank_locations`)."""
    windows = blocks.batch(0, CALIBRATION_WINDOWS)  # [n, T]: the same rows in every process
    attention, mlp = activation_column_scores(lm, windows, batch_size=batch_size)
    mlp = order_mlp_channels(lm, mlp)
    return rank_locations(arch, unit_scores_from_columns(arch, attention, mlp))
