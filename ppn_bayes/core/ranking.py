"""From the posterior to hard masks: the deterministic ranking.

Every layer and every unit crosses keep probability ½ at some global scale ``τ`` (at the
posterior median of the scales). Ordering them by that crossing gives one ranking; the
mask for a size is the longest prefix of the ranking whose cost fits the budget. So:

* masks are nested: the mask for a smaller size is a prefix of the one for a larger size;
* the hierarchy holds: since ``π_lu ≤ π_l`` a unit crosses after its layer, so no prefix
  keeps a unit of a dropped layer;
* a mask is short of its budget by less than the cost of the next item in the ranking.

A fit's ranking also knows the sizes the fit trained (``FitConfig.trained_range``): a mask
asked for outside them is a prefix that no training step used, and comes with an
:class:`UntrainedSizeWarning`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .architecture import Architecture
from .budget import Budget
from .gating import Gates

__all__ = ["Masks", "Ranking", "UntrainedSizeWarning", "crossing_log_tau"]


class UntrainedSizeWarning(UserWarning):
    """Masks were asked for at a size outside the sizes the fit trained: the LM never learnt
    to work under them, so expect that sub-network to be worse than the trained sizes."""


def crossing_log_tau(log_lambda_layer: torch.Tensor, log_lambda_unit: torch.Tensor, *, steps: int = 80):
    """``log τ`` at which each layer ``[L]`` and each unit ``[L, U]`` has keep probability ½.

    Layer: ``σ(2(t + a)) = ½`` gives ``t = -a``. Unit: ``σ(2(t + a))·σ(2(t + a + b)) = ½``,
    increasing in ``t``, solved by bisection; it always lies above its layer's crossing.
    """
    a = log_lambda_layer.double()[:, None]  # [L, 1]
    b = log_lambda_unit.double()  # [L, U]
    half = float(a.abs().max() + (a + b).abs().max()) + 25.0
    low = torch.full_like(b, -half)
    high = torch.full_like(b, half)
    for _ in range(steps):
        mid = 0.5 * (low + high)
        above = torch.sigmoid(2 * (mid + a)) * torch.sigmoid(2 * (mid + a + b)) > 0.5
        high = torch.where(above, mid, high)
        low = torch.where(above, low, mid)
    return -a[:, 0], 0.5 * (low + high)


@dataclass(frozen=True)
class Masks:
    """Hard masks: ``layer [L]`` and ``unit [L, U]`` (bool), and what they cost."""

    arch: Architecture
    layer: torch.Tensor
    unit: torch.Tensor
    size_requested: float
    kept_params: int
    total_params: int

    @property
    def size_reached(self) -> float:
        return self.kept_params / self.total_params

    def gates(self, device=None, dtype=torch.float32) -> Gates:
        """The masks as gates, for the masked-dense reference (a kept unit in a dropped
        layer cannot occur)."""
        return Gates(self.layer.to(device=device, dtype=dtype), self.unit.to(device=device, dtype=dtype))

    def __le__(self, other: "Masks") -> bool:
        """``a <= b``: everything ``a`` keeps, ``b`` keeps (nesting)."""
        return bool((~self.layer | other.layer).all() and (~self.unit | other.unit).all())

    def flat(self) -> torch.Tensor:
        """``[L + L·U]`` bool: the layers kept, then each layer's units (attention units first)."""
        return torch.cat([self.layer.flatten(), self.unit.flatten()]).bool()

    def marks(self) -> str:
        """:meth:`flat` as a string of 0 and 1: how a fit's evaluations keep the deployed masks
        (``kept`` in ``validation.jsonl``); :func:`flat_from_marks` reads it back."""
        return "".join("1" if k else "0" for k in self.flat().tolist())


def flat_from_marks(marks: str) -> torch.Tensor:
    """The ``[L + L·U]`` bool tensor of a :meth:`Masks.marks` string.

    Raises
    ------
    ValueError
        When ``marks`` holds anything but 0 and 1.
    """
    if set(marks) - {"0", "1"}:
        raise ValueError(f"masks are a string of 0 and 1, got {marks[:40]!r}")
    return torch.tensor([c == "1" for c in marks], dtype=torch.bool)


class Ranking:
    """Layers and units in the order they are kept as the size grows.

    ``items [K, 2]`` holds ``(layer, unit)`` pairs, ``unit = -1`` for a layer itself;
    ``cost [K]`` their parameter counts; ``K = L · (1 + U)``. ``trained``: the smallest and
    largest size the fit trained (``None`` for a ranking that no fit trained, or of unknown
    origin): masks outside them warn (:class:`UntrainedSizeWarning`).
    """

    def __init__(self, arch: Architecture, items: torch.Tensor, cost: torch.Tensor,
                 trained: tuple[float, float] | None = None):
        self.arch = arch
        self.items = items
        self.cost = cost
        self.trained = _check_trained(trained)
        self._cumulative = torch.cumsum(cost, 0)

    def trained_on(self, smallest: float, largest: float) -> "Ranking":
        """The same ranking, known to come from a fit that trained sizes ``smallest`` to ``largest``."""
        return Ranking(self.arch, self.items, self.cost, trained=(smallest, largest))

    def untrained(self, size: float) -> bool:
        """Whether ``size`` lies outside the sizes the fit trained (:attr:`trained`; a ranking
        that does not know them counts every size as trained)."""
        return self.trained is not None and not self.trained[0] <= size <= self.trained[1]

    @classmethod
    def from_log_lambda(cls, arch: Architecture, log_lambda_layer, log_lambda_unit) -> "Ranking":
        """Rank by crossing ``log τ``; ties keep layers first, then lower indices."""
        layer_cross, unit_cross = crossing_log_tau(log_lambda_layer.cpu(), log_lambda_unit.cpu())
        return cls._from_keys(arch, layer_cross, unit_cross)

    @classmethod
    def from_guide(cls, guide) -> "Ranking":
        """The ranking at the guide's posterior median."""
        return cls.from_log_lambda(guide.arch, *guide.median_log_lambda())

    @classmethod
    def random(cls, arch: Architecture, seed: int = 0) -> "Ranking":
        """A random ranking that respects the hierarchy (a baseline: random cuts)."""
        generator = torch.Generator().manual_seed(seed)
        layer_key = torch.rand(arch.n_layers, generator=generator, dtype=torch.float64)
        unit_key = torch.rand(arch.n_layers, arch.n_units, generator=generator, dtype=torch.float64)
        return cls._from_keys(arch, layer_key, torch.maximum(unit_key, layer_key[:, None]))

    @classmethod
    def _from_keys(cls, arch: Architecture, layer_key: torch.Tensor, unit_key: torch.Tensor) -> "Ranking":
        L, U = arch.n_layers, arch.n_units
        layer_cost, unit_cost = arch.costs(dtype=torch.int64)
        layers = torch.arange(L)
        keys = torch.cat([layer_key, unit_key.flatten()])
        kind = torch.cat([torch.zeros(L, dtype=torch.long), torch.ones(L * U, dtype=torch.long)])
        item_layer = torch.cat([layers, layers.repeat_interleave(U)])
        item_unit = torch.cat([torch.full((L,), -1), torch.arange(U).repeat(L)])
        cost = torch.cat([layer_cost, unit_cost.flatten()])
        # Lexicographic sort: key, then layers before units, then layer, then unit.
        order = torch.arange(keys.numel())
        for column in (item_unit, item_layer, kind, keys):
            order = order[torch.sort(column[order], stable=True).indices]
        items = torch.stack([item_layer[order], item_unit[order]], dim=1)
        return cls(arch, items, cost[order])

    @property
    def total_params(self) -> int:
        return self.arch.total_cost

    def prefix_length(self, budget: int) -> int:
        """How many ranked items fit within ``budget`` parameters."""
        return int(torch.searchsorted(self._cumulative, torch.tensor(budget, dtype=self._cumulative.dtype),
                                      right=True))

    def masks(self, size: float) -> Masks:
        """Masks for a fraction ``size`` of the decoder's parameters."""
        return self.masks_for(Budget(size=size))

    def masks_for(self, budget: Budget) -> Masks:
        """Masks for a :class:`~ppn_bayes.core.budget.Budget` (a size or a parameter count);
        an :class:`UntrainedSizeWarning` when the size lies outside the sizes the fit trained."""
        n_params = budget.params(self.total_params)
        masks = self.masks_for_params(n_params, size_requested=budget.size)  # a budget it refuses: no warning
        size = budget.size if budget.size is not None else n_params / self.total_params
        if self.untrained(size):
            smallest, largest = self.trained
            warnings.warn(f"size {size:.4g} lies outside the sizes the fit trained ({smallest:g} to {largest:g}): "
                          "no training step used this sub-network, so expect it to be worse than the trained "
                          "sizes; to train it, fit with sizes that include it (--size-min, --size-max, "
                          "--train-sizes)", UntrainedSizeWarning, stacklevel=2)
        return masks

    def masks_for_params(self, n_params: int, *, size_requested: float | None = None) -> Masks:
        """Masks for a budget of ``n_params`` decoder parameters."""
        if n_params > self.total_params or n_params <= 0:
            raise ValueError(f"a budget of {n_params} parameters is outside (0, {self.total_params}]")
        k = self.prefix_length(n_params)
        if k == 0:
            raise ValueError(
                f"a budget of {n_params} parameters is below the smallest sub-network "
                f"({int(self.cost[0])} parameters)"
            )
        L, U = self.arch.n_layers, self.arch.n_units
        layer = torch.zeros(L, dtype=torch.bool)
        unit = torch.zeros(L, U, dtype=torch.bool)
        kept = self.items[:k]
        is_layer = kept[:, 1] < 0
        layer[kept[is_layer, 0]] = True
        unit[kept[~is_layer, 0], kept[~is_layer, 1]] = True
        return Masks(
            arch=self.arch,
            layer=layer,
            unit=unit,
            size_requested=size_requested if size_requested is not None else n_params / self.total_params,
            kept_params=int(self._cumulative[k - 1]),
            total_params=self.total_params,
        )

    # -- files: the ranking as JSON, validated when read ------------------------------------
    def to_dict(self) -> dict:
        """``{"items": [[layer, unit], ...], "cost": [...]}`` (``unit = -1``: the layer), and
        ``"trained_sizes": [smallest, largest]`` for a fit's ranking."""
        data = {"items": self.items.tolist(), "cost": self.cost.tolist()}
        if self.trained is not None:
            data["trained_sizes"] = list(self.trained)
        return data

    @classmethod
    def from_dict(cls, arch: Architecture, data: dict) -> "Ranking":
        """A ranking read from :meth:`to_dict`'s output, checked against ``arch``.

        Raises ``ValueError`` naming the problem unless the items are every layer and
        every unit exactly once, each unit after its own layer (the hierarchy), each cost is
        that item's cost in ``arch``, and the optional ``trained_sizes`` are two sizes in
        order (a file written before it knew them has none).
        """
        if not isinstance(data, dict) or "items" not in data or "cost" not in data:
            raise ValueError("a ranking needs 'items' and 'cost'")
        items, cost = data["items"], data["cost"]
        L, U = arch.n_layers, arch.n_units
        K = L * (1 + U)
        if not isinstance(items, list) or not isinstance(cost, list) or len(items) != K or len(cost) != K:
            raise ValueError(f"a ranking of this architecture has {K} items and {K} costs")
        for pair in items:
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
                raise ValueError(f"ranking item {pair!r} is not a [layer, unit] pair of integers")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in cost):
            raise ValueError("ranking costs must be integers")
        items_t = torch.tensor(items, dtype=torch.long)  # [K, 2]
        layer, unit = items_t[:, 0], items_t[:, 1]
        if bool(((layer < 0) | (layer >= L) | (unit < -1) | (unit >= U)).any()):
            raise ValueError(f"a ranking item lies outside {L} layers x {U} units")
        key = layer * (U + 1) + (unit + 1)
        if torch.unique(key).numel() != K:
            raise ValueError("the ranking lists an item twice (and so misses another)")
        position = torch.empty(K, dtype=torch.long)
        position[key] = torch.arange(K)
        layer_position = position[torch.arange(L) * (U + 1)]  # [L]
        late = (unit >= 0) & (torch.arange(K) < layer_position[layer])
        if bool(late.any()):
            l, u = items_t[late][0].tolist()
            raise ValueError(f"the ranking puts unit {u} of layer {l} before its layer (inconsistent hierarchy)")
        layer_cost, unit_cost = arch.costs(dtype=torch.int64)
        expected = torch.where(unit < 0, layer_cost[layer], unit_cost[layer, unit.clamp_min(0)])
        cost_t = torch.tensor(cost, dtype=torch.int64)
        if not torch.equal(cost_t, expected):
            raise ValueError("the ranking's costs differ from the architecture's")
        trained = data.get("trained_sizes")
        if trained is not None and not (isinstance(trained, list) and len(trained) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in trained)):
            raise ValueError(f"'trained_sizes' must be [smallest, largest], two sizes, got {trained!r}")
        return cls(arch, items_t, cost_t, trained=None if trained is None else (trained[0], trained[1]))


def _check_trained(trained) -> tuple[float, float] | None:
    """``(smallest, largest)`` as floats with ``0 < smallest <= largest <= 1``, or ``None``."""
    if trained is None:
        return None
    smallest, largest = (float(x) for x in trained)
    if not 0 < smallest <= largest <= 1:
        raise ValueError(f"the trained sizes must satisfy 0 < smallest <= largest <= 1, got {smallest}, {largest}")
    return smallest, largest
