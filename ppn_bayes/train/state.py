"""What a fit holds while it runs (:class:`FitState`) and what it returns (:class:`PuppetFit`,
:class:`FitResult`)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyro
import torch
from torch import nn

from ..core.adapters import SizeAdapters
from ..core.architecture import Architecture
from ..core.config import FitConfig
from ..core.gating import GatedLM
from ..core.model import PuppetGuide, PuppetModel
from ..core.ranking import Ranking
from .checkpoint import versions

__all__ = ["FitResult", "PuppetFit", "FitState", "build_adapters", "build_guide", "build_model", "build_optimizer",
           "lm_parameters"]


@dataclass
class FitResult:
    """The record of a fit: settings, losses, cost, versions.

    ``history`` holds the losses every ``log_every`` steps, averaged over processes: ``loss``
    (the negative ELBO per token), ``nll_full`` (the next-token NLL of the rows the full LM
    read; ``None`` when the LM is frozen or no row was the full LM's that step), the sizes the step trained (``sizes``: the
    smallest, then the random ones), the sizes their gates kept (``realised``), and per size
    the rows' next-token NLL (``nll``) and KL to the teacher (``kl``).
    ``validation`` holds the held-out NLL (see :func:`~ppn_bayes.train.fit`'s ``eval_tokens``).
    ``train_tokens`` and ``tokens_per_s`` count the global batch (all processes);
    ``seconds`` is the wall time of the training loop of this call and ``step_times``
    the time since that loop began at which each step it ran was finished (its losses
    read back from the device). ``data`` is the identity of the training text;
    ``checkpoint_bytes`` the size of the last checkpoint written, per part (``lm``,
    ``guide``, ``optimizer``, ``state``, ``total``). A fit keeps one checkpoint, replaced
    atomically, so the optimizer's state is only ever in the newest.
    """

    config: dict
    architecture: dict
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    steps_done: int = 0
    train_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    device: str = "cpu"
    checkpoint: str | None = None
    world_size: int = 1
    parallel: str = "none"
    step_times: list[float] = field(default_factory=list)
    data: dict | None = None
    peak_memory_bytes: int | None = None
    checkpoint_bytes: dict | None = None
    versions: dict = field(default_factory=versions)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        """The result as plain JSON-ready data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The result as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class PuppetFit:
    """A fitted push puppet network: the LM (point estimate) and the guide ``q(log λ)``, and
    with ``FitConfig.size_rank > 0`` the size adapters (:mod:`ppn_bayes.core.adapters`) whose
    correction of each size :meth:`lm_at` merges into the LM's weights."""

    lm: nn.Module
    guide: PuppetGuide
    config: FitConfig
    result: FitResult
    adapters: SizeAdapters | None = None

    def lm_at(self, size: float) -> nn.Module:
        """The LM whose sub-network of ``size`` ships: a copy of :attr:`lm` with the size
        adapters' correction of ``size`` merged into its weights, ``W + Σ_k w_k(size) B_k A_k``
        (float64, cast to the weights' dtype); :attr:`lm` is left untouched. Slice it with the
        masks of the same size (``build_subnetwork(fit.lm_at(s), fit.masks(s))``). Without
        adapters, :attr:`lm` itself (there is nothing to merge)."""
        if self.adapters is None:
            return self.lm
        return self.adapters.merge_(copy.deepcopy(self.lm), size)

    def subnetwork(self, size: float | None = None, *, n_params: int | None = None):
        """``(sub-network, masks)`` that ship at ``size`` (or ``n_params``): the masks of the
        ranking, sliced from :meth:`lm_at` of the size they were asked for
        (``masks.size_requested``; a parameter budget's fraction of the decoder's parameters)."""
        from ..core.budget import Budget

        masks = self.ranking().masks_for(Budget(size, n_params))
        return self.subnetwork_of(masks), masks

    def subnetwork_of(self, masks) -> nn.Module:
        """The sub-network ``masks`` keep, sliced from :meth:`lm_at` of ``masks.size_requested``
        (what :meth:`subnetwork` returns for them). With size adapters, the correction is merged
        into :attr:`lm` in place for the slicing and undone to the bit after (the slices are
        copies), so no second LM is held."""
        from ..deploy.subnetwork import build_subnetwork

        if self.adapters is None:
            return build_subnetwork(self.lm, masks)
        with self.adapters.merged(self.lm, masks.size_requested) as lm:
            return build_subnetwork(lm, masks)

    @property
    def arch(self) -> Architecture:
        """The units and costs of the LM (see :mod:`ppn_bayes.core.architecture`)."""
        return self.guide.arch

    def ranking(self):
        """The deterministic ranking of layers and units (see :mod:`ppn_bayes.core.ranking`),
        which knows the sizes this fit trained (:attr:`FitConfig.trained_range`)."""
        from ..core.ranking import Ranking

        return Ranking.from_guide(self.guide).trained_on(*self.config.trained_range)

    def masks(self, size: float):
        """Hard masks for ``size``: the longest prefix of the ranking within budget."""
        return self.ranking().masks(size)


def build_guide(config: FitConfig, arch: Architecture, prior_scale: float) -> PuppetGuide:
    """The guide ``q(log λ)`` a fit with ``config`` starts from."""
    return PuppetGuide(
        arch, hierarchy=config.hierarchy, prior_scale=prior_scale, temperature=config.temperature,
        posterior=config.posterior, init_scale=config.init_scale, layer_init=config.layer_init,
        gate_coupling=config.gate_coupling, init_jitter=config.init_jitter, seed=config.seed,
    )


def build_adapters(lm: nn.Module, config: FitConfig) -> SizeAdapters | None:
    """The size adapters a fit with ``config`` starts from (``None`` for ``size_rank=0``):
    float32 (float64 for a float64 LM), on the LM's device, seeded by ``config.seed``."""
    if not config.size_rank:
        return None
    weight = next(lm.parameters())
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return SizeAdapters(lm, config.size_anchors, config.size_rank, seed=config.seed, dtype=dtype).to(weight.device)


def build_model(lm: nn.Module, config: FitConfig, arch: Architecture, prior_tokens: int,
                device: torch.device | None):
    """Gated LM (with the size adapters of ``config.size_rank > 0``), model and guide;
    ``device=None`` leaves them where they are (FSDP moves shards).

    The prior KL is scaled by ``prior_weight / prior_tokens`` (per token, like the likelihood)."""
    pyro.settings.set(module_local_params=True)
    gated = GatedLM(lm, arch, adapters=build_adapters(lm, config))
    prior_scale = config.prior_weight / (config.prior_tokens or prior_tokens)
    model = PuppetModel(gated, hierarchy=config.hierarchy, prior_scale=prior_scale,
                        temperature=config.temperature, distill_weight=config.distill_weight,
                        nll_weight=config.nll_weight, gate_coupling=config.gate_coupling)
    guide = build_guide(config, arch, prior_scale)
    if device is not None:
        model, guide = model.to(device), guide.to(device)
    return gated, model, guide, prior_scale


def lm_parameters(lm: nn.Module) -> list[nn.Parameter]:
    """The LM's trainable weights."""
    return [p for p in lm.parameters() if p.requires_grad]


def build_optimizer(lm: nn.Module, guide: PuppetGuide, config: FitConfig,
                    adapters: SizeAdapters | None = None) -> torch.optim.Optimizer:
    """AdamW with two groups, named ``guide`` and ``lm`` (the LM's only when it trains, with
    β2 = ``adam_beta2``; the size ``adapters``' parameters, when given, after the LM's);
    its fused kernels where every parameter is on a GPU."""
    groups = [{"name": "guide", "params": list(guide.parameters()), "lr": config.lr_guide, "weight_decay": 0.0}]
    if config.train_lm:
        extra = list(adapters.parameters()) if adapters is not None else []
        groups.append({"name": "lm", "params": lm_parameters(lm) + extra, "lr": config.lr_lm,
                       "weight_decay": config.weight_decay, "betas": (0.9, config.adam_beta2)})
    on_gpu = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=True) if on_gpu else torch.optim.AdamW(groups)


def group(optimizer: torch.optim.Optimizer, name: str) -> dict:
    """The optimizer's parameter group called ``name``."""
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return g
    raise KeyError(f"the optimizer has no parameter group {name!r}")


@dataclass
class FitState:
    """Everything a running fit holds: the modules, the optimizer, where it is, what it logged.

    ``runner`` is the step module as the parallel engine wraps it (DDP, FSDP2 or itself);
    ``teacher`` the frozen original LM for ``teacher='original'`` (else ``None``);
    ``settled`` the posterior's median ranking while the guide is frozen (``hold_steps``, ``settle_steps``);
    ``guide_sum`` the guide's parameters summed over the steps averaged so far (``average_steps``).
    """

    config: FitConfig
    arch: Architecture
    lm: nn.Module
    gated: GatedLM
    model: PuppetModel
    guide: PuppetGuide
    optimizer: torch.optim.Optimizer
    runner: nn.Module
    teacher: nn.Module | None = None
    teacher_fingerprint: str | None = None
    step: int = 0
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    checkpoint_bytes: dict | None = None
    settled: Ranking | None = None  # the guide's ranking while it is frozen (hold_steps, settle_steps)
    guide_sum: dict[str, torch.Tensor] | None = None  # the guide's parameters summed so far (average_steps)


def copy_frozen(lm: nn.Module) -> nn.Module:
    """A frozen copy of ``lm`` in eval mode: the original teacher."""
    return copy.deepcopy(lm).requires_grad_(False).eval()
