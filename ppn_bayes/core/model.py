"""The generative model and the guide of a push puppet network.

Read top to bottom, :class:`PuppetModel` is the story of docs/method.md:

1. the strings: a scale ``λ_l ~ HalfCauchy(1)`` for every layer and ``λ_lu ~
   HalfCauchy(1)`` for every unit of every layer (plates ``layer`` and ``unit``);
2. the push: the global scale ``τ`` is the root of the budget equation for the
   requested ``size`` (a ``deterministic`` site, with the expected size it reaches);
3. the gates: for every size of the step (plate ``size``), ``gate_layer ~ Bernoulli(π_l)``
   and, given its layer is on, ``gate_unit ~ Bernoulli(π_lu / π_l)``, relaxed with
   straight-through so gradients pass;
4. the likelihood: every row of the batch is read by the LM under the gates of its own
   size (or with every gate on: the full LM), scored by its next-token log-likelihood and a
   distillation term towards a teacher (:mod:`ppn_bayes.core.objective`), in one pass.

:class:`PuppetGuide` is mean-field normal on the log-scales, ``q(log λ)``, amortised over
sizes: it solves ``τ(s)`` for whatever size it is handed and draws gates from the same
``π`` as the model. The gate terms of the ELBO therefore cancel exactly; both sides mask
them out (``poutine.mask(mask=False)``) rather than evaluate two equal log-densities of a
straight-through sample. What remains is ``E_q[log-likelihood] - KL(q(log λ) ‖ p(log λ))``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from pyro.distributions.util import is_identically_zero
from torch import nn

from .architecture import Architecture
from .budget import check_size, expected_size, keep_logits, solve_log_tau
from .config import COUPLINGS
from .gating import GatedLM, Gates
from .objective import Teacher, fused_objective

__all__ = ["PuppetModel", "PuppetGuide", "PuppetELBO", "plates", "sample_gates", "prefix_gates", "COUPLINGS",
           "FLAT_LOG_LAMBDA", "StepPlan"]

#: ``log λ_l`` of every layer without the hierarchy (flat units): ``π_l = σ(60 + ...) = 1``.
FLAT_LOG_LAMBDA = 30.0


def plates(L: int, U: int):
    """The plates ``layer`` (dim -2) and ``unit`` (dim -1), built once a trace and reused."""
    return pyro.plate("layer", L, dim=-2), pyro.plate("unit", U, dim=-1)


@dataclass(frozen=True)
class StepPlan:
    """Which rows of a batch train which size, and how much each row weighs.

    ``sizes``: the ``K`` sizes whose gates are drawn; ``groups [B]``: each row's group, 0
    for the full LM (every gate on) and ``k`` for ``sizes[k - 1]``; ``row_weights [B]``:
    each row's weight in the likelihood (its per-token loss is a mean over positions).
    :meth:`single` puts every row at one size with equal weights.
    """

    sizes: tuple[float, ...]
    groups: torch.Tensor
    row_weights: torch.Tensor

    def __post_init__(self):
        if not self.sizes:
            raise ValueError("a step plan needs one size at least")
        for size in self.sizes:
            check_size(size)

    @classmethod
    def single(cls, size: float, batch_size: int, device=None) -> "StepPlan":
        """Every one of ``batch_size`` rows at ``size``, each weighing ``1 / batch_size``."""
        return cls((float(size),), torch.ones(batch_size, dtype=torch.long, device=device),
                   torch.full((batch_size,), 1.0 / batch_size, device=device))


def _straight_through(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """``1[logits + noise > 0]`` forward, the gradient of ``σ((logits + noise) / T)`` backward."""
    soft = torch.sigmoid((logits + noise) / temperature)
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())


def _marginal_unit_logits(layer_logits: torch.Tensor, unit_logits: torch.Tensor) -> torch.Tensor:
    """``logit π_lu`` from the layer's logits and the unit's conditional logits, ``π_lu = π_l · σ(unit)``."""
    log_pi_unit = F.logsigmoid(layer_logits)[..., None] + F.logsigmoid(unit_logits)  # [L, U]
    return log_pi_unit - torch.log1p(-log_pi_unit.exp().clamp(max=1 - 1e-7))


def prefix_gates(layer_logits: torch.Tensor, unit_logits: torch.Tensor, layer_cost: torch.Tensor,
                 unit_cost: torch.Tensor, size, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates ``(z_l [L], z_lu [L, U])`` that keep the longest prefix of the keep ranking
    (layers and units by marginal keep logit, largest first) whose cost fits ``size``.

    The rule of the deployed masks, applied to one draw of the scales: the realised size is
    ``size`` less than one unit's cost, in every draw. Hard 0/1 forward; backward, the
    gradient of ``σ((logit π - θ) / T)`` with the threshold ``θ`` (midway between the last
    kept and the first dropped logit) held fixed. A layer ranks before its units (``π_lu ≤
    π_l``, ties to the layer), so no unit outlives its layer. No host sync: the prefix
    length stays a device tensor.
    """
    L, U = unit_logits.shape
    marginal = _marginal_unit_logits(layer_logits, unit_logits)
    scores = torch.cat([layer_logits, marginal.flatten()])  # [L + L·U], layers first for ties
    costs = torch.cat([layer_cost, unit_cost.flatten()]).to(device=scores.device, dtype=torch.float64)
    ranked = scores.detach()
    order = torch.sort(ranked, descending=True, stable=True).indices  # [N]
    cumulative = costs[order].cumsum(0)  # [N]
    budget = costs.sum() * size  # a Python size multiplies on the device, without a host copy
    n_kept = (cumulative <= budget * (1 + 1e-12)).sum()  # [] on the device
    N = scores.numel()
    in_prefix = (torch.arange(N, device=scores.device) < n_kept).to(scores.dtype)  # [N], ranked order
    hard = torch.zeros_like(scores).scatter(0, order, in_prefix)  # [N]
    sorted_scores = ranked[order]
    padded = torch.cat([sorted_scores[:1] + 1, sorted_scores, sorted_scores[-1:] - 1])  # [N + 2]
    around = padded.index_select(0, torch.stack([n_kept, n_kept + 1]))  # last kept, first dropped
    threshold = around.mean()
    soft = torch.sigmoid((scores - threshold) / temperature)
    z = hard + (soft - soft.detach())
    return z[:L], z[L:].reshape(L, U)


def sample_gates(layer_plate, unit_plate, layer_logits, unit_logits, temperature: float,
                 coupling: str = "independent", *, costs: tuple[torch.Tensor, torch.Tensor] | None = None,
                 size=None, size_plate=None) -> Gates:
    """Sample sites ``gate_layer [L, 1]`` and ``gate_unit [L, U]`` (relaxed, hard forward);
    inside ``size_plate`` (dim -3), one draw per size: ``[K, L, 1]`` and ``[K, L, U]`` from
    logits ``[K, L]`` and ``[K, L, U]``, and ``size`` is then the sequence of the ``K`` sizes.

    ``coupling='independent'``: every gate its own relaxed Bernoulli draw, the unit's given its
    layer (``unit_logits`` are the conditional logits of :func:`~ppn_bayes.core.budget.keep_logits`).
    ``coupling='shared'``: one logistic draw ``ε`` per size (sample site ``gate_noise``, a
    uniform ``u`` read as ``ε = logit(u)``) drives every gate, ``z = 1[logit π + ε > 0]`` with
    the *marginal* ``π``: each gate is still ``Bernoulli(π)``, but the draws are comonotone, so
    the kept units are always the ``π``-largest (a prefix of a ranking), like the masks that
    are deployed; ``π_lu ≤ π_l`` keeps the hierarchy. But the realised size varies from
    draw to draw: where the ``π`` are close, one ``ε`` keeps nearly all or nearly nothing.
    ``coupling='prefix'``: no noise of its own; given the draw of the scales, the gates keep
    the longest prefix of the keep ranking that fits ``size`` (:func:`prefix_gates`, which
    needs ``costs = (layer_cost, unit_cost)`` and ``size``): every training mask is a
    deployed-style mask of the requested size, the randomness is the posterior's.

    Their log-densities are masked: model and guide draw them from the same ``π``.
    """
    temperature_t = torch.full((), temperature, device=layer_logits.device)  # a fill, not a host copy
    per_size = size_plate is not None
    with poutine.mask(mask=False), (size_plate if per_size else contextlib.nullcontext()):
        if coupling == "prefix":
            if costs is None or size is None:
                raise ValueError("coupling='prefix' needs the costs and the size")
            if per_size:
                drawn = [prefix_gates(layer_logits[k], unit_logits[k], *costs, s, temperature)
                         for k, s in enumerate(size)]
                z_layer, z_unit = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
            else:
                z_layer, z_unit = prefix_gates(layer_logits, unit_logits, *costs, size, temperature)
            with layer_plate:
                z_layer = pyro.sample("gate_layer", dist.Delta(z_layer[..., None]))
                with unit_plate:
                    z_unit = pyro.sample("gate_unit", dist.Delta(z_unit))
            return Gates(layer=z_layer[..., 0], unit=z_unit)
        if coupling == "shared":
            u = pyro.sample("gate_noise", dist.Uniform(torch.zeros((), device=layer_logits.device),
                                                       torch.ones((), device=layer_logits.device)))
            eps = torch.logit(u.clamp(1e-6, 1 - 1e-6))  # [K, 1, 1] per size, else []
            marginal_unit = _marginal_unit_logits(layer_logits, unit_logits)
            z_layer = _straight_through(layer_logits, eps[..., 0] if per_size else eps, temperature)[..., None]
            z_unit = _straight_through(marginal_unit, eps, temperature)  # [K, L, U] or [L, U]
            with layer_plate:
                z_layer = pyro.sample("gate_layer", dist.Delta(z_layer))
                with unit_plate:
                    z_unit = pyro.sample("gate_unit", dist.Delta(z_unit))
            return Gates(layer=z_layer[..., 0], unit=z_unit)
        with layer_plate:
            z_layer = pyro.sample(
                "gate_layer",
                dist.RelaxedBernoulliStraightThrough(temperature_t, logits=layer_logits[..., None]),
            )  # [K, L, 1] or [L, 1]
            with unit_plate:
                z_unit = pyro.sample(
                    "gate_unit",
                    dist.RelaxedBernoulliStraightThrough(temperature_t, logits=unit_logits),
                )  # [K, L, U] or [L, U]
    return Gates(layer=z_layer[..., 0], unit=z_unit)


class _Push(PyroModule):
    """What model and guide share: costs, the hierarchy switch, and τ(size)."""

    def __init__(self, arch: Architecture, *, hierarchy: bool, prior_scale: float, temperature: float,
                 gate_coupling: str = "independent"):
        super().__init__()
        if gate_coupling not in COUPLINGS:
            raise ValueError(f"gate_coupling must be one of {', '.join(map(repr, COUPLINGS))}, got {gate_coupling!r}")
        self.arch = arch
        self.gate_coupling = gate_coupling
        self.hierarchy = hierarchy
        self.prior_scale = prior_scale
        self.temperature = temperature
        layer_cost, unit_cost = arch.costs()
        self.register_buffer("layer_cost", layer_cost, persistent=False)
        self.register_buffer("unit_cost", unit_cost, persistent=False)

    def prior_weighting(self):
        """Scale the ``λ`` sites by ``prior_scale``; at 0 (no prior, an ablation) leave them
        out of the ELBO altogether (``poutine.scale`` refuses a zero scale)."""
        if self.prior_scale == 0:
            return poutine.mask(mask=False)
        return poutine.scale(scale=self.prior_scale)

    def realised_size(self, gates: Gates) -> torch.Tensor:
        """The size ``gates`` keep (hard part): ``(Σ z_l c_l + Σ z_l z_lu c_lu) / C``, a
        detached device tensor (no host sync): 0-d, or ``[K]`` for gates of ``K`` sizes."""
        layer = gates.layer.detach().to(self.layer_cost.dtype)  # [*K, L]
        unit = gates.unit.detach().to(self.unit_cost.dtype)  # [*K, L, U]
        kept = (layer * self.layer_cost).sum(-1) + (layer[..., None] * unit * self.unit_cost).sum((-2, -1))
        return kept / (self.layer_cost.sum() + self.unit_cost.sum())

    def push(self, size, log_lambda_layer, log_lambda_unit, *, validate: bool = True):
        """``log τ`` for ``size``, and the gate logits it implies (``validate=False``: sizes
        already checked on the host, see :func:`~ppn_bayes.core.budget.solve_log_tau`)."""
        log_tau = solve_log_tau(size, log_lambda_layer, log_lambda_unit, self.layer_cost, self.unit_cost,
                                validate=validate)
        return (log_tau, *keep_logits(log_tau, log_lambda_layer, log_lambda_unit))

    def push_sizes(self, sizes: tuple[float, ...], log_lambda_layer, log_lambda_unit):
        """:meth:`push` for each of ``K`` sizes at once: ``log τ [K]``, logits ``[K, L]``, ``[K, L, U]``.
        The sizes are filled on the device (no host copy, no sync)."""
        K = len(sizes)
        size = torch.stack([torch.full((), float(s), dtype=torch.float64, device=log_lambda_unit.device)
                            for s in sizes])  # [K]
        return self.push(size, log_lambda_layer.expand(K, *log_lambda_layer.shape),
                         log_lambda_unit.expand(K, *log_lambda_unit.shape), validate=False)

    @staticmethod
    def plan_of(plan, input_ids: torch.Tensor) -> StepPlan:
        """A :class:`StepPlan`, or one size for every row of ``input_ids``."""
        return plan if isinstance(plan, StepPlan) else StepPlan.single(plan, input_ids.shape[0], input_ids.device)

    def effective(self, log_lambda_layer, log_lambda_unit):
        """``(log λ_l, log λ_lu)`` as the budget equation reads them.

        Without the hierarchy every layer is kept: ``log λ_l = 30`` makes ``π_l = 1``, and
        the unit's log-scale is read shifted by ``-30`` so that its keep probability is
        ``σ(2·(log τ + log λ_lu))``, free of any layer scale.
        """
        if self.hierarchy:
            return log_lambda_layer, log_lambda_unit
        flat = torch.full(log_lambda_unit.shape[:-1], FLAT_LOG_LAMBDA, dtype=log_lambda_unit.dtype,
                          device=log_lambda_unit.device)
        return flat, log_lambda_unit - FLAT_LOG_LAMBDA


class PuppetModel(_Push):
    """``p(λ, gates, tokens | sizes)`` for a :class:`GatedLM` whose weights train with it.

    Call as ``model(input_ids, plan, teacher=None)``: ``input_ids [B, T]``; ``plan`` a
    :class:`StepPlan` (which row trains which size) or one size for every row; ``teacher`` a
    :class:`~ppn_bayes.core.objective.Teacher` (or its logits ``[B, T, V]``) for the distillation
    term, ``None`` for the next-token likelihood alone. Each row's loss is ``nll_weight`` ·
    its next-token NLL + ``distill_weight`` · KL(teacher ‖ LM), per token.
    """

    def __init__(
        self,
        gated: GatedLM,
        *,
        hierarchy: bool = True,
        prior_scale: float = 1.0,
        temperature: float = 0.5,
        distill_weight: float = 1.0,
        nll_weight: float = 1.0,
        gate_coupling: str = "independent",
        chunk: int = 4096,
    ):
        super().__init__(gated.arch, hierarchy=hierarchy, prior_scale=prior_scale, temperature=temperature,
                         gate_coupling=gate_coupling)
        self.gated = gated
        self.distill_weight = distill_weight
        self.nll_weight = nll_weight
        #: ``objective(hidden, head, input_ids, row_weights, teacher, nll_weight=, kl_weight=)``:
        #: the fused, chunked objective; a test may put the plain reference in its place.
        self.objective = functools.partial(fused_objective, chunk=chunk)
        self.chunk = chunk

    def compile(self, backend: str) -> None:
        """Compile the gated LM's forward and the objective's chunks with ``backend``."""
        self.gated.compile(backend=backend)
        self.objective = functools.partial(fused_objective, chunk=self.chunk, compile=backend)

    def forward(self, input_ids: torch.Tensor, plan, teacher=None):
        plan = self.plan_of(plan, input_ids)
        L, U, K = self.arch.n_layers, self.arch.n_units, len(plan.sizes)
        one = torch.ones((), device=input_ids.device)
        layer_plate, unit_plate = plates(L, U)
        # 1. The strings of the puppet: global-local shrinkage, as in the horseshoe.
        with self.prior_weighting():
            with layer_plate:
                if self.hierarchy:
                    lambda_layer = pyro.sample("lambda_layer", dist.HalfCauchy(one))  # [L, 1]
                with unit_plate:
                    lambda_unit = pyro.sample("lambda_unit", dist.HalfCauchy(one))  # [L, U]
        log_lambda_layer, log_lambda_unit = self.effective(
            lambda_layer.log()[..., 0] if self.hierarchy else None, lambda_unit.log()
        )
        # 2. The push: for each size s of the step, τ is the root of E[size | τ] = s.
        log_tau, layer_logits, unit_logits = self.push_sizes(plan.sizes, log_lambda_layer, log_lambda_unit)  # [K], ...
        pyro.deterministic("tau", log_tau.exp())
        pyro.deterministic(
            "expected_size",
            expected_size(log_tau, log_lambda_layer, log_lambda_unit, self.layer_cost, self.unit_cost),
        )
        # 3. The gates of each size, relaxed so that the likelihood is differentiable in π.
        gates = sample_gates(layer_plate, unit_plate, layer_logits, unit_logits, self.temperature,
                             self.gate_coupling, costs=(self.layer_cost, self.unit_cost), size=plan.sizes,
                             size_plate=pyro.plate("size", K, dim=-3))  # [K, L], [K, L, U]
        # 4. The likelihood: every row under the gates of its group (group 0: every gate on).
        total = self.likelihood(input_ids, plan, teacher, gates)
        pyro.factor("log_likelihood", -total)
        return total

    def likelihood(self, input_ids: torch.Tensor, plan: StepPlan, teacher, gates: Gates) -> torch.Tensor:
        """Step 4 of :meth:`forward` alone, no Pyro site: the rows' weighted loss (the negative
        log-likelihood) when the ``K`` sizes of ``plan`` have ``gates`` (``[K, L]``,
        ``[K, L, U]``) and group 0 every gate on. A fit's settling steps call it with the
        deployed masks (``FitConfig.settle_steps``). With size adapters every row also reads its
        size's correction (:meth:`size_weights`)."""
        if isinstance(teacher, torch.Tensor):
            teacher = Teacher(logits=teacher)
        self.last_realised_size = self.realised_size(gates)  # [K] on the device, read by the fit's log
        ones = Gates.ones(self.arch, device=input_ids.device, dtype=gates.unit.dtype)
        row_gates = Gates(torch.cat([ones.layer[None], gates.layer]).index_select(0, plan.groups),  # [B, L]
                          torch.cat([ones.unit[None], gates.unit]).index_select(0, plan.groups))  # [B, L, U]
        hidden = self.gated.hidden(input_ids, row_gates, self.size_weights(plan, input_ids.device))  # [B, T, d]
        total, rows = self.objective(hidden, self.gated.head, input_ids, plan.row_weights, teacher,
                                     nll_weight=self.nll_weight, kl_weight=self.distill_weight)
        self.last_rows = rows  # per-row NLL and KL, detached, read by the fit's log
        return total

    def size_weights(self, plan: StepPlan, device) -> torch.Tensor | None:
        """The size adapters' weights of each row ``[B, K]`` (rows of group 0, the full LM, at
        size 1), or ``None`` when the gated LM has no adapters. The sizes are filled on the
        device (no host copy); the weights of each group are indexed by ``plan.groups``."""
        if self.gated.adapters is None:
            return None
        sizes = torch.stack([torch.full((), float(s), dtype=torch.float64, device=device)
                             for s in (1.0, *plan.sizes)])  # [1 + K]
        return self.gated.size_weights(sizes).index_select(0, plan.groups)  # [B, K]


class PuppetGuide(_Push):
    """``q(log λ)``: mean-field normal (``posterior='normal'``) or a point (``'point'``).

    About ``L · (1 + U)`` pairs of numbers: the small number of gating parameters.
    ``layer_init`` is the initial ``log λ_l``: above zero, layers start safer than units.
    """

    def __init__(
        self,
        arch: Architecture,
        *,
        hierarchy: bool = True,
        prior_scale: float = 1.0,
        temperature: float = 0.5,
        posterior: str = "normal",
        init_scale: float = 0.1,
        layer_init: float = 1.0,
        gate_coupling: str = "independent",
        init_jitter: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(arch, hierarchy=hierarchy, prior_scale=prior_scale, temperature=temperature,
                         gate_coupling=gate_coupling)
        if posterior not in ("normal", "point"):
            raise ValueError(f"posterior must be 'normal' or 'point', got {posterior!r}")
        self.posterior = posterior
        L, U = arch.n_layers, arch.n_units
        self.loc_layer = nn.Parameter(torch.full((L,), float(layer_init)))
        # ``init_jitter``: a seeded spread of the initial unit locations; with shared gate
        # coupling, equal scales would keep or drop every unit of a layer together.
        jitter = torch.randn((L, U), generator=torch.Generator().manual_seed(seed)) * init_jitter
        self.loc_unit = nn.Parameter(jitter)
        self.log_scale_layer = nn.Parameter(torch.full((L,), math.log(init_scale)))
        self.log_scale_unit = nn.Parameter(torch.full((L, U), math.log(init_scale)))

    def _q(self, loc, log_scale):
        if self.posterior == "point":
            return dist.Delta(loc.exp())
        return dist.LogNormal(loc, log_scale.exp())

    def forward(self, input_ids: torch.Tensor, plan, teacher=None):
        plan = self.plan_of(plan, input_ids)
        L, U = self.arch.n_layers, self.arch.n_units
        layer_plate, unit_plate = plates(L, U)
        with self.prior_weighting():
            with layer_plate:
                if self.hierarchy:
                    lambda_layer = pyro.sample(
                        "lambda_layer", self._q(self.loc_layer[:, None], self.log_scale_layer[:, None])
                    )
                with unit_plate:
                    lambda_unit = pyro.sample("lambda_unit", self._q(self.loc_unit, self.log_scale_unit))
        log_lambda_layer, log_lambda_unit = self.effective(
            lambda_layer.log()[..., 0] if self.hierarchy else None, lambda_unit.log()
        )
        _, layer_logits, unit_logits = self.push_sizes(plan.sizes, log_lambda_layer, log_lambda_unit)
        return sample_gates(layer_plate, unit_plate, layer_logits, unit_logits, self.temperature,
                            self.gate_coupling, costs=(self.layer_cost, self.unit_cost), size=plan.sizes,
                            size_plate=pyro.plate("size", len(plan.sizes), dim=-3))

    # -- posterior summaries that need no sampling ----------------------------------------
    def median_log_lambda(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior medians ``(log λ_l [L], log λ_lu [L, U])`` (the ``loc`` parameters), as
        the budget equation reads them (:meth:`effective`)."""
        return self.effective(self.loc_layer.detach(), self.loc_unit.detach())

    def sample_log_lambda(self, n: int, generator: torch.Generator | None = None):
        """``n`` draws ``(log λ_l [n, L], log λ_lu [n, L, U])`` from ``q``, without Pyro, as
        the budget equation reads them (:meth:`effective`)."""
        layer_loc, unit_loc = self.loc_layer.detach(), self.loc_unit.detach()
        if self.posterior == "point":
            return self.effective(layer_loc.expand(n, -1).clone(), unit_loc.expand(n, -1, -1).clone())
        layer_eps = torch.randn((n, *layer_loc.shape), generator=generator)
        unit_eps = torch.randn((n, *unit_loc.shape), generator=generator)
        unit = unit_loc + unit_eps.to(unit_loc) * self.log_scale_unit.detach().exp()
        layer = layer_loc + layer_eps.to(layer_loc) * self.log_scale_layer.detach().exp()
        layer, unit = self.effective(layer, unit)
        return layer, unit


class PuppetELBO(pyro.infer.Trace_ELBO):
    """``Trace_ELBO`` whose loss stays on the device.

    Pyro's ``Trace_ELBO`` also adds up a float copy of every site's log-density, one host
    round trip (a device sync) per site, to report the loss's value next to its surrogate.
    Every latent site of a push puppet network is reparameterised (the gates and
    ``gate_noise`` are masked), so the surrogate *is* the negative ELBO: this returns it
    directly, with the same value and gradients (``tests/test_fit.py`` checks both against
    ``Trace_ELBO``). A site that would need a score-function term is refused.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    elbo = elbo + site["log_prob_sum"]
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample":
                    _, score_function_term, entropy_term = site["score_parts"]
                    if not is_identically_zero(score_function_term):
                        raise NotImplementedError(
                            f"guide site {name!r} is not reparameterised; PuppetELBO handles only "
                            "reparameterised latent sites (use pyro.infer.Trace_ELBO)"
                        )
                    if not is_identically_zero(entropy_term):
                        elbo = elbo - entropy_term.sum()
            loss = loss - elbo / self.num_particles
        return loss
