"""The generative model and the guide of a push puppet network.

Read top to bottom, :class:`PuppetModel` is the story of docs/method.md:

1. the strings: a scale ``λ_l ~ HalfCauchy(1)`` for every layer and ``λ_lu ~
   HalfCauchy(1)`` for every unit of every layer (plates ``layer`` and ``unit``);
2. the push: the global scale ``τ`` is the root of the budget equation for the
   requested ``size`` (a ``deterministic`` site, with the expected size it reaches);
3. the gates: ``gate_layer ~ Bernoulli(π_l)`` and, given its layer is on, ``gate_unit ~
   Bernoulli(π_lu / π_l)``, relaxed with straight-through so gradients pass;
4. the likelihood: the LM's own next-token log-likelihood under the gates, plus an
   optional self-distillation term towards the same LM with all gates on.

:class:`PuppetGuide` is mean-field normal on the log-scales, ``q(log λ)``, amortised over
sizes: it solves ``τ(s)`` for whatever size it is handed and draws gates from the same
``π`` as the model. The gate terms of the ELBO therefore cancel exactly; both sides mask
them out (``poutine.mask(mask=False)``) rather than evaluate two equal log-densities of a
straight-through sample. What remains is ``E_q[log-likelihood] - KL(q(log λ) ‖ p(log λ))``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from pyro.distributions.util import is_identically_zero
from torch import nn

from .architecture import Architecture
from .budget import expected_size, keep_logits, solve_log_tau
from .config import COUPLINGS
from .gating import GatedLM, Gates

__all__ = ["PuppetModel", "PuppetGuide", "PuppetELBO", "plates", "sample_gates", "prefix_gates", "COUPLINGS",
           "FLAT_LOG_LAMBDA", "distillation_kl"]

#: ``log λ_l`` of every layer without the hierarchy (flat units): ``π_l = σ(60 + ...) = 1``.
FLAT_LOG_LAMBDA = 30.0


def distillation_kl(log_probs: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, mean over tokens: ``log_probs [B, T-1, V]`` the
    student's next-token log-probabilities, ``teacher_logits [B, T, V]`` the teacher's logits."""
    teacher = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    return F.kl_div(log_probs, teacher, log_target=True, reduction="none").sum(-1).mean()


def plates(L: int, U: int):
    """The plates ``layer`` (dim -2) and ``unit`` (dim -1), built once a trace and reused."""
    return pyro.plate("layer", L, dim=-2), pyro.plate("unit", U, dim=-1)


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
                 size=None) -> Gates:
    """Sample sites ``gate_layer [L, 1]`` and ``gate_unit [L, U]`` (relaxed, hard forward).

    ``coupling='independent'``: every gate its own relaxed Bernoulli draw, the unit's given its
    layer (``unit_logits`` are the conditional logits of :func:`~ppn_bayes.budget.keep_logits`).
    ``coupling='shared'``: one logistic draw ``ε`` (sample site ``gate_noise``, a uniform
    ``u`` read as ``ε = logit(u)``) drives every gate, ``z = 1[logit π + ε > 0]`` with the
    *marginal* ``π``: each gate is still ``Bernoulli(π)``, but the draws are comonotone, so
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
    with poutine.mask(mask=False):
        if coupling == "prefix":
            if costs is None or size is None:
                raise ValueError("coupling='prefix' needs the costs and the size")
            z_layer, z_unit = prefix_gates(layer_logits, unit_logits, *costs, size, temperature)
            with layer_plate:
                z_layer = pyro.sample("gate_layer", dist.Delta(z_layer[..., None]))
                with unit_plate:
                    z_unit = pyro.sample("gate_unit", dist.Delta(z_unit))
            return Gates(layer=z_layer[..., 0], unit=z_unit)
        if coupling == "shared":
            u = pyro.sample("gate_noise", dist.Uniform(torch.zeros((), device=layer_logits.device),
                                                       torch.ones((), device=layer_logits.device)))
            eps = torch.logit(u.clamp(1e-6, 1 - 1e-6))
            marginal_unit = _marginal_unit_logits(layer_logits, unit_logits)
            z_layer = _straight_through(layer_logits, eps, temperature)[..., None]  # [L, 1]
            z_unit = _straight_through(marginal_unit, eps, temperature)  # [L, U]
            with layer_plate:
                z_layer = pyro.sample("gate_layer", dist.Delta(z_layer))
                with unit_plate:
                    z_unit = pyro.sample("gate_unit", dist.Delta(z_unit))
            return Gates(layer=z_layer[..., 0], unit=z_unit)
        with layer_plate:
            z_layer = pyro.sample(
                "gate_layer",
                dist.RelaxedBernoulliStraightThrough(temperature_t, logits=layer_logits[..., None]),
            )  # [L, 1]
            with unit_plate:
                z_unit = pyro.sample(
                    "gate_unit",
                    dist.RelaxedBernoulliStraightThrough(temperature_t, logits=unit_logits),
                )  # [L, U]
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
        detached 0-d device tensor (no host sync)."""
        layer = gates.layer.detach().to(self.layer_cost.dtype)  # [L]
        unit = gates.unit.detach().to(self.unit_cost.dtype)  # [L, U]
        kept = (layer * self.layer_cost).sum() + (layer[:, None] * unit * self.unit_cost).sum()
        return kept / (self.layer_cost.sum() + self.unit_cost.sum())

    def push(self, size, log_lambda_layer, log_lambda_unit):
        """``log τ`` for ``size``, and the gate logits it implies."""
        log_tau = solve_log_tau(size, log_lambda_layer, log_lambda_unit, self.layer_cost, self.unit_cost)
        return (log_tau, *keep_logits(log_tau, log_lambda_layer, log_lambda_unit))

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
    """``p(λ, gates, tokens | size)`` for a :class:`GatedLM` whose weights train with it.

    Call as ``model(input_ids, size, teacher_logits=None)``; ``input_ids [B, T]``.
    """

    def __init__(
        self,
        gated: GatedLM,
        *,
        hierarchy: bool = True,
        prior_scale: float = 1.0,
        temperature: float = 0.5,
        distill_weight: float = 1.0,
        gate_coupling: str = "independent",
    ):
        super().__init__(gated.arch, hierarchy=hierarchy, prior_scale=prior_scale, temperature=temperature,
                         gate_coupling=gate_coupling)
        self.gated = gated
        self.distill_weight = distill_weight

    def forward(self, input_ids: torch.Tensor, size: float, teacher_logits: torch.Tensor | None = None):
        L, U = self.arch.n_layers, self.arch.n_units
        device = input_ids.device
        one = torch.ones((), device=device)
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
        # 2. The push: τ is the root of E[size | τ] = size.
        log_tau, layer_logits, unit_logits = self.push(size, log_lambda_layer, log_lambda_unit)
        pyro.deterministic("tau", log_tau.exp())
        pyro.deterministic(
            "expected_size",
            expected_size(log_tau, log_lambda_layer, log_lambda_unit, self.layer_cost, self.unit_cost),
        )
        # 3. The gates, relaxed so that the likelihood is differentiable in π.
        gates = sample_gates(layer_plate, unit_plate, layer_logits, unit_logits, self.temperature,
                             self.gate_coupling, costs=(self.layer_cost, self.unit_cost), size=size)
        self.last_realised_size = self.realised_size(gates)  # a device tensor, read by the fit's log
        # 4. The likelihood: the LM's own next-token log-likelihood under the gates.
        logits = self.gated(input_ids, gates=gates)  # [B, T, V]
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
        targets = input_ids[:, 1:]  # [B, T-1]
        nll = -log_probs.gather(-1, targets[..., None]).mean()
        pyro.factor("log_likelihood", -nll)
        if teacher_logits is not None and self.distill_weight > 0:
            # Self-distillation: KL(teacher ‖ gated LM), per token; the teacher is the full
            # LM, or a frozen copy of the LM the fit started from (FitConfig.teacher).
            pyro.factor("distillation", -self.distill_weight * distillation_kl(log_probs, teacher_logits))
        return nll


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

    def forward(self, input_ids: torch.Tensor, size: float, teacher_logits: torch.Tensor | None = None):
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
        _, layer_logits, unit_logits = self.push(size, log_lambda_layer, log_lambda_unit)
        return sample_gates(layer_plate, unit_plate, layer_logits, unit_logits, self.temperature,
                            self.gate_coupling, costs=(self.layer_cost, self.unit_cost), size=size)

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
