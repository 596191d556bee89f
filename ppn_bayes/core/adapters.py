"""Size adapters: a few parameters of each size's own, merged exactly into the weights at export.

One LM's weights serve every sub-network size of a fit. Size adapters give each size a
low-rank correction of the two output projections of every decoder layer (attention
``o_proj``, MLP ``down_proj``), interpolated in the size between ``K`` anchor sizes
``a_1 < … < a_K``:

* the weights ``w(s) ∈ R^K`` are piecewise-linear hat functions of the size ``s``
  (:func:`anchor_weights`): they sum to 1, are one-hot at an anchor, linear between two
  neighbouring anchors and clamp to the nearest end anchor outside ``[a_1, a_K]``;
* for each projection with weight ``W ∈ R^{D_out × D_in}``, anchor ``k`` has ``A_k ∈ R^{r ×
  D_in}`` and ``B_k ∈ R^{D_out × r}`` (``A ~ N(0, 1/D_in)``, seeded; ``B = 0``, so that at
  the start the gated LM is the base LM exactly);
* in training the projection's output of a row at size ``s`` gets ``Σ_k w_k(s) · (x A_kᵀ)
  B_kᵀ`` added, ``x`` the projection's input after the unit gates, before the layer gate
  multiplies the output (:class:`~ppn_bayes.core.gating.GatedLM`);
* at export the correction is merged: ``W'(s) = W + Σ_k w_k(s) B_k A_k`` (computed in
  float64, cast to ``W``'s dtype), and the sub-network of size ``s`` is sliced from ``W'``.

Masking the input columns commutes with the merge (a dropped column of ``W'`` meets a zero
input either way), so the sliced sub-network of ``W'(s)`` computes what the gated LM does.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn

from .architecture import decoder_layers, family_of, get_module
from .config import check_anchors

__all__ = ["PROJECTIONS", "SizeAdapters", "anchor_weights", "check_anchors", "check_adaptable", "refuse_adapters"]

#: The projections a size adapter corrects, by their :class:`~ppn_bayes.core.architecture.Family`
#: attribute: the attention output (``o``) and the MLP output (``mlp_out``).
PROJECTIONS = ("o", "mlp_out")


def anchor_weights(size, anchors) -> torch.Tensor:
    """The interpolation weights ``w(s) [..., K]`` (float64) of sizes ``size`` (a number or a
    tensor ``[...]``) over the ``K`` sorted ``anchors``: hat functions, so ``w`` sums to 1, is
    one-hot at an anchor, linear between two neighbours and clamped to the end anchors outside
    them. Device tensors stay on their device (no host sync)."""
    anchors = torch.as_tensor(anchors, dtype=torch.float64,
                              device=size.device if isinstance(size, torch.Tensor) else None)
    s = torch.as_tensor(size, dtype=torch.float64, device=anchors.device)
    K = anchors.numel()
    if K == 1:
        return torch.ones((*s.shape, 1), dtype=torch.float64, device=s.device)
    s = torch.minimum(torch.maximum(s, anchors[0]), anchors[-1])
    j = (torch.searchsorted(anchors, s.contiguous(), right=True) - 1).clamp(0, K - 2)  # the left anchor
    left, right = anchors[j], anchors[j + 1]
    t = (s - left) / (right - left)  # 0 at the left anchor, 1 at the right, exactly
    w = torch.zeros((*s.shape, K), dtype=torch.float64, device=s.device)
    w = w.scatter(-1, j[..., None], (1 - t)[..., None])
    return w.scatter(-1, (j + 1)[..., None], t[..., None])


def check_adaptable(lm: nn.Module) -> None:
    """Refuse an LM whose projections are GPT-2 style ``Conv1D`` (weights stored transposed):
    size adapters handle ``nn.Linear`` projections only."""
    family = family_of(lm)
    if family.conv1d:
        raise ValueError(f"size adapters (size_rank > 0) are not available for {family.name} models, whose "
                         "projections are Conv1D (transposed weights); fit with size_rank=0")


def refuse_adapters(size_rank: int, source, what: str) -> None:
    """Refuse a fit with size adapters (``size_rank > 0``) on a path that would drop them:
    ``what`` (e.g. "a mask file") holds one set of weights for every size, where each size of
    such a fit has its own merged weights."""
    if size_rank:
        raise ValueError(
            f"{source} is a fit with size adapters (size_rank={size_rank}): {what} cannot carry them (every size "
            "has its own merged weights, W + sum_k w_k(s) B_k A_k), and dropping them would ship other "
            "sub-networks than the fit trained; cut each size from the fit itself (ppn-bayes resize CHECKPOINT --size "
            "S --out DIR without --keep-ranked, ppn-bayes eval or distill CHECKPOINT --size S, or "
            "PuppetFit.subnetwork(size) in Python)")


class _LayerAdapter(nn.Module):
    """One decoder layer's adapters: ``o_A [K, r, D_in]``, ``o_B [K, D_out, r]`` and alike
    ``mlp_out_A``, ``mlp_out_B``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], K: int, rank: int, generator: torch.Generator,
                 dtype: torch.dtype):
        super().__init__()
        for name in PROJECTIONS:
            d_out, d_in = shapes[name]
            a = torch.randn((K, rank, d_in), generator=generator, dtype=torch.float64) / math.sqrt(d_in)
            setattr(self, f"{name}_A", nn.Parameter(a.to(dtype)))
            setattr(self, f"{name}_B", nn.Parameter(torch.zeros((K, d_out, rank), dtype=dtype)))


class SizeAdapters(nn.Module):
    """The size adapters of an LM: for every decoder layer ``l`` and projection ``p`` of
    :data:`PROJECTIONS`, ``A [K, r, D_in]`` and ``B [K, D_out, r]`` (parameters
    ``layers.<l>.<p>_A`` and ``layers.<l>.<p>_B``), over the sorted ``anchors`` (a
    non-persistent buffer ``[K]``).

    ``A`` starts ``N(0, 1/D_in)`` from a generator seeded with ``seed``, ``B`` at zero.
    """

    def __init__(self, lm: nn.Module, anchors: Sequence[float], rank: int, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        check_adaptable(lm)
        anchors = check_anchors(anchors)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"size adapters need a rank of at least 1, got {rank!r}")
        family = family_of(lm)
        self.rank = rank
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float64), persistent=False)
        generator = torch.Generator().manual_seed(1_000_003 * seed + 7919)  # apart from the guide's stream
        layers = []
        for layer in decoder_layers(lm):
            shapes = {name: tuple(get_module(layer, getattr(family, name)).weight.shape) for name in PROJECTIONS}
            layers.append(_LayerAdapter(shapes, len(anchors), rank, generator, dtype))
        self.layers = nn.ModuleList(layers)

    @property
    def n_anchors(self) -> int:
        """``K``, the number of anchor sizes."""
        return self.anchors.numel()

    def weights(self, sizes) -> torch.Tensor:
        """:func:`anchor_weights` of ``sizes`` over this adapter's anchors, float64 ``[..., K]``."""
        return anchor_weights(sizes, self.anchors)

    def parameters_of(self, index: int, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [K, r, D_in], B [K, D_out, r])`` of layer ``index``'s ``projection``."""
        layer = self.layers[index]
        return getattr(layer, f"{projection}_A"), getattr(layer, f"{projection}_B")

    def delta(self, index: int, projection: str, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_k w_k · (x A_kᵀ) B_kᵀ`` ``[B, T, D_out]`` for inputs ``x [B, T, D_in]`` and per-row
        weights ``[B, K]`` (or shared ``[K]``), in the adapters' dtype."""
        A, B = self.parameters_of(index, projection)
        K, r, d_in = A.shape
        w = weights.to(A.dtype)
        if w.dim() == 1:
            w = w[None]  # [1, K]
        h = x.to(A.dtype) @ A.reshape(K * r, d_in).t()  # [B, T, K·r]
        h = h * w.repeat_interleave(r, dim=-1)[:, None, :]
        return h @ B.permute(0, 2, 1).reshape(K * r, -1)  # [B, T, D_out]

    @torch.no_grad()
    def merged_delta(self, index: int, projection: str, size: float) -> torch.Tensor:
        """``Σ_k w_k(size) B_k A_k`` ``[D_out, D_in]`` in float64."""
        A, B = self.parameters_of(index, projection)
        w = self.weights(float(size)).to(A.device)  # [K]
        return torch.einsum("k,kor,kri->oi", w, B.double(), A.double())

    def _projections(self, lm: nn.Module):
        family = family_of(lm)
        layers = decoder_layers(lm)
        if len(layers) != len(self.layers):
            raise ValueError(f"these size adapters have {len(self.layers)} layers, the LM {len(layers)}")
        for index, layer in enumerate(layers):
            for name in PROJECTIONS:
                yield index, name, get_module(layer, getattr(family, name))

    @torch.no_grad()
    def merge_(self, lm: nn.Module, size: float) -> nn.Module:
        """Merge the correction of ``size`` into ``lm``'s weights in place: ``W ← W + Σ_k
        w_k(size) B_k A_k`` (float64, then cast to ``W``'s dtype). Returns ``lm``."""
        check_adaptable(lm)
        for index, name, module in self._projections(lm):
            weight = module.weight
            delta = self.merged_delta(index, name, size).to(weight.device)
            if delta.shape != weight.shape:
                raise ValueError(f"size adapter of layer {index} ({name}) is {tuple(delta.shape)}, the weight "
                                 f"{tuple(weight.shape)}")
            weight.copy_((weight.double() + delta).to(weight.dtype))
        return lm

    @contextlib.contextmanager
    def merged(self, lm: nn.Module, size: float):
        """``lm`` with the correction of ``size`` merged in place inside the ``with`` block; its
        weights are restored to the bit afterwards (copies of the projections' weights are kept)."""
        saved = [module.weight.detach().clone() for _, _, module in self._projections(lm)]
        try:
            yield self.merge_(lm, size)
        finally:
            with torch.no_grad():
                for (_, _, module), weight in zip(self._projections(lm), saved):
                    module.weight.copy_(weight)
