"""Keep probabilities and the budget equation: the push.

For scales ``λ_l`` (layer) and ``λ_lu`` (unit) and global scale ``τ``::

    π_l(τ)  = σ(2·(log τ + log λ_l))
    π_lu(τ) = π_l(τ) · σ(2·(log τ + log λ_l + log λ_lu))

``x²/(1+x²) = σ(2 log x)`` is the horseshoe's shrinkage complement. ``τ`` is not a free
parameter: it is the root of the budget equation

    E[size | τ] = (Σ_l c_l π_l(τ) + Σ_lu c_lu π_lu(τ)) / C = s,

monotone in ``τ``, found by bisection on ``log τ``. Gradients reach the scales through
the implicit-function theorem: ``d log τ / dθ = -(∂F/∂θ) / (∂F/∂ log τ)``.

All functions broadcast over leading dimensions (draws, sizes).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

__all__ = ["Budget", "check_size", "keep_logits", "keep_probs", "expected_size", "solve_log_tau"]


def check_size(size) -> float:
    """``size`` as a float: a fraction of the decoder's parameters in ``(0, 1]``, else
    ``ValueError`` (the one message every refused size gets)."""
    try:
        value = float(size) if not isinstance(size, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:  # NaN too
        raise ValueError(f"size must lie in (0, 1], got {size!r}")
    return value


@dataclass(frozen=True)
class Budget:
    """What a sub-network may keep: a ``size`` (the kept fraction of the decoder's
    parameters, in ``(0, 1]``) or a parameter count ``n_params`` (an integer of at least
    1), exactly one of them. Checked once, when built; ``Budget(size=0.5).size`` is a float
    and ``Budget(n_params=10**6).n_params`` an int whatever number type they were given as."""

    size: float | None = None
    n_params: int | None = None

    def __post_init__(self):
        if (self.size is None) == (self.n_params is None):
            raise ValueError(f"give exactly one of a size and a parameter count, got size={self.size!r} "
                             f"and n_params={self.n_params!r}")
        if self.size is not None:
            object.__setattr__(self, "size", check_size(self.size))
            return
        count = self.n_params
        try:
            whole = not isinstance(count, bool) and int(count) == count
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or count < 1:
            raise ValueError(f"a parameter count must be an integer of at least 1, got {count!r}")
        object.__setattr__(self, "n_params", int(count))

    def params(self, total_params: int) -> int:
        """The budget in parameters, of a decoder of ``total_params`` (a size rounds down)."""
        return int(self.size * total_params) if self.size is not None else self.n_params


def keep_logits(log_tau, log_lambda_layer, log_lambda_unit):
    """Logits of ``π_l`` ``[*, L]`` and of the unit's conditional keep ``[*, L, U]``.

    ``log_tau [*]``, ``log_lambda_layer [*, L]``, ``log_lambda_unit [*, L, U]``. The
    conditional is the unit's keep probability given its layer is kept:
    ``π_lu = π_l · σ(unit logit)``.
    """
    log_tau = log_tau[..., None]  # [*, 1]
    layer = 2.0 * (log_tau + log_lambda_layer)  # [*, L]
    unit = 2.0 * (log_tau[..., None] + log_lambda_layer[..., None] + log_lambda_unit)  # [*, L, U]
    return layer, unit


def keep_probs(log_tau, log_lambda_layer, log_lambda_unit):
    """``(π_l [*, L], π_lu [*, L, U])``: marginal keep probabilities."""
    layer, unit = keep_logits(log_tau, log_lambda_layer, log_lambda_unit)
    pi_layer = torch.sigmoid(layer)
    return pi_layer, pi_layer[..., None] * torch.sigmoid(unit)


def expected_size(log_tau, log_lambda_layer, log_lambda_unit, layer_cost, unit_cost):
    """``E[size | τ]`` as a fraction of the decoder's cost ``C``, shape ``[*]``."""
    pi_layer, pi_unit = keep_probs(log_tau, log_lambda_layer, log_lambda_unit)
    total = layer_cost.sum() + unit_cost.sum()
    kept = (pi_layer * layer_cost).sum(-1) + (pi_unit * unit_cost).sum((-2, -1))
    return kept / total


def _bracket(log_lambda_layer, log_lambda_unit) -> torch.Tensor:
    """A half-width for ``log τ`` that holds every root: past it all π are ~0 or ~1.

    A 0-d tensor on the scales' device (no host sync)."""
    span = log_lambda_layer.detach().abs().max() + (
        log_lambda_layer.detach()[..., None] + log_lambda_unit.detach()
    ).abs().max()
    return span + 25.0


def _search_bits(batch_numel: int, n_scales: int) -> int:
    """Bits narrowed per round of the search: ``2**bits - 1`` points evaluated at once.

    One round costs a handful of kernel launches, so 15 points a round (16 rounds instead of
    64 bisection steps) cut the launches fourfold; wider grids cost more arithmetic on a CPU
    than they save. Batches of many roots (posterior draws) keep a narrower grid so that the
    ``[*, points, L, U]`` intermediate stays small."""
    for bits in (4, 2):
        if batch_numel * n_scales * (2**bits - 1) <= 2**22:
            return bits
    return 1


def solve_log_tau(size, log_lambda_layer, log_lambda_unit, layer_cost, unit_cost, *, bits: int | None = None,
                  validate: bool = True):
    """``log τ`` solving the budget equation for ``size`` (a float or a tensor ``[*]``).

    A search in float64 without gradients finds the root ``t₀``: each round evaluates
    ``E[size | t]`` at ``2**bits - 1`` points of the bracket at once and keeps the
    interval that holds the root, until 64 bits are narrowed (``bits=1`` is bisection).
    The returned value is ``t₀ + (F(t₀) - F(t₀).detach()) · (-1 / ∂F/∂t)``: equal to ``t₀``
    and carrying the implicit-function gradient to the scales and nothing else.
    """
    batch = log_lambda_layer.shape[:-1]
    device = log_lambda_layer.device
    if isinstance(size, (int, float)):  # checked on the host, filled on the device: no sync
        size = torch.full(batch, check_size(size), dtype=torch.float64, device=device)
    else:
        size = torch.as_tensor(size, dtype=torch.float64, device=device)
        if validate and bool(((size <= 0) | (size > 1)).any()):  # a host sync: callers that checked skip it
            raise ValueError(f"size must lie in (0, 1], got {size.tolist()}")
        size = size.expand(batch) if size.dim() == 0 else size
    costs = (layer_cost.to(torch.float64), unit_cost.to(torch.float64))
    if bits is None:
        bits = _search_bits(size.numel(), log_lambda_unit.shape[-2:].numel())
    with torch.no_grad():
        ll, lu = log_lambda_layer.detach().double(), log_lambda_unit.detach().double()
        half = _bracket(ll, lu)
        high = half.to(torch.float64).expand(size.shape).clone()  # [*]
        low = -high
        fractions = torch.arange(1, 2**bits, dtype=torch.float64, device=device) / 2**bits  # [P]
        ll_p, lu_p = ll[..., None, :], lu[..., None, :, :]  # [*, 1, L], [*, 1, L, U]
        for _ in range(-(-64 // bits)):
            points = low[..., None] + (high - low)[..., None] * fractions  # [*, P]
            # E[size | t] rises with t: the points below the root come first.
            below = (expected_size(points, ll_p, lu_p, *costs) <= size[..., None]).sum(-1, keepdim=True)  # [*, 1]
            grid = torch.cat([low[..., None], points, high[..., None]], dim=-1)  # [*, P + 2]
            low = grid.gather(-1, below)[..., 0]
            high = grid.gather(-1, below + 1)[..., 0]
        root = 0.5 * (low + high)
    if not (log_lambda_layer.requires_grad or log_lambda_unit.requires_grad):
        return root.to(log_lambda_layer.dtype)
    # Implicit-function gradient: F(t, θ) = E[size | t, θ] - s.
    t = root.clone().requires_grad_(True)
    with torch.enable_grad():
        f_t = expected_size(t, ll, lu, *costs)
        (slope,) = torch.autograd.grad(f_t.sum(), t)
    f = expected_size(root, log_lambda_layer.double(), log_lambda_unit.double(), *costs)
    slope = slope.clamp_min(1e-30)
    return (root - (f - f.detach()) / slope).to(log_lambda_layer.dtype)
