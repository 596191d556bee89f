"""One training step: every size of the step in one forward and one backward pass.

The step's sizes follow the sandwich rule: the full LM (every gate on; unless
``train_full_lm`` is off), the smallest size ``size_min``, the named ``train_sizes`` and
``n_random_sizes`` sizes drawn from ``[size_min, size_max]``. Instead of
one pass of the whole batch per size, the rows of the global batch are dealt to the sizes
in turn (global row ``g`` to group ``g mod K``), and one pass of the gated LM reads every
row under the gates of its own size (:class:`~ppn_bayes.core.model.StepPlan`). A step then
costs one teacher forward and one student forward and backward, as a plain distillation
step does, whatever the number of sizes. Each size's rows weigh ``1 / K`` of the
likelihood, spread evenly over them, so every size counts alike.

The last ``settle_steps`` steps of a fit settle: the guide is frozen and the rows of each
size are read under the masks that ship at that size (:func:`deployed_gates`), the
likelihood alone (no Pyro trace, no prior term). With ``average_steps`` the guide first takes
the mean of its parameters over that many steps before (:func:`average_guide`). The first
``hold_steps`` steps are alike, under the masks of the guide's start: the LM learns to work
cut before the posterior moves the structure.

Row weights carry the factor ``world_size · accumulate``: a micro-batch's loss is divided
by ``accumulate`` before its backward and DDP averages gradients over processes, so the
step's gradient is that of ``Σ_g w_g ℓ_g + KL(q ‖ p)`` over the global batch, whatever
its split into processes and micro-batches.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core.config import FitConfig
from ..core.gating import Gates
from ..core.model import PuppetELBO, PuppetGuide, PuppetModel, StepPlan
from ..core.objective import Teacher
from ..core.ranking import Ranking
from ..core.schedule import lr_factor
from . import seeds
from .state import FitState, group

__all__ = ["StepLoss", "average_guide", "averaging", "deployed_gates", "guide_frozen", "holds", "self_teacher",
           "settles", "step_sizes", "step_plan", "teacher_of", "train_step"]


class StepLoss(nn.Module):
    """The negative ELBO of one micro-batch, ``PuppetELBO()(model, guide)``, as the single
    module that DDP or FSDP2 wraps. Its parameters are the LM's and the guide's."""

    def __init__(self, model: PuppetModel, guide: PuppetGuide):
        super().__init__()
        self.elbo = PuppetELBO()(model, guide)  # Trace_ELBO without host syncs; an nn.Module

    def forward(self, input_ids: torch.Tensor, plan: StepPlan, teacher: Teacher | str | None = None,
                gates: Gates | None = None) -> torch.Tensor:
        """``teacher='self'``: the LM itself with every gate on teaches, read here, inside the
        wrapped module (where FSDP has gathered the shards). ``gates`` (``[K, L]``, ``[K, L, U]``,
        a settling step's deployed masks): the likelihood under them alone, without the guide."""
        if teacher == "self":
            teacher = self_teacher(self.elbo.model.gated, input_ids)
        if gates is not None:
            return self.elbo.model.likelihood(input_ids, plan, teacher, gates)
        return self.elbo(input_ids, plan, teacher)


@torch.no_grad()
def self_teacher(gated, input_ids: torch.Tensor) -> Teacher:
    """The LM with every gate on, as a teacher (through the same, possibly compiled, graph)."""
    B = input_ids.shape[0]
    ones = Gates.ones(gated.arch, device=input_ids.device)
    rows = Gates(ones.layer.expand(B, -1), ones.unit.expand(B, -1, -1))  # the compiled graph's shapes
    return Teacher(hidden=gated.hidden(input_ids, rows), head=gated.head.detach())


def step_sizes(config: FitConfig, step: int) -> list[float]:
    """The gated sizes of ``step``: ``size_min``, the ``train_sizes`` (every step, as given),
    then ``n_random_sizes`` draws ``size_min + (size_max - size_min) · u^size_power``, ``u``
    uniform on [0, 1) (the same draws with or without ``train_sizes``)."""
    draws = torch.rand(config.n_random_sizes, generator=seeds.stream("sizes", config.seed, step), dtype=torch.float64)
    between = config.size_min + (config.size_max - config.size_min) * draws ** config.size_power
    return [config.size_min, *config.train_sizes, *between.tolist()]


def step_groups(config: FitConfig, step: int, global_rows: int) -> tuple[list[float], torch.Tensor]:
    """The gated sizes of ``step`` and the group of each global row ``[G]`` (0, the full LM,
    only while the LM trains and ``train_full_lm`` is on; ``k`` for the ``k``-th gated size).

    Rows are dealt to the groups in turn, starting at group ``step mod K``: a global batch
    smaller than the number of groups trains some groups each step, all of them in turn."""
    sizes = step_sizes(config, step)
    groups = ([0] if config.full_lm_rows else []) + list(range(1, len(sizes) + 1))
    member = (torch.arange(global_rows) + step) % len(groups)  # [G] index into groups
    return sizes, torch.tensor(groups)[member]


def step_plan(config: FitConfig, step: int, *, rows: int, first_row: int, global_rows: int,
              scale: float) -> StepPlan:
    """The plan of the ``rows`` rows that start at global row ``first_row`` of a global batch of
    ``global_rows``: their groups, and their weights ``scale / (K · n_k)`` (``K`` groups with
    rows this step, ``n_k`` rows in group ``k``): every group weighs alike."""
    sizes, row_group = step_groups(config, step, global_rows)
    counts = torch.bincount(row_group, minlength=len(sizes) + 1).to(torch.float64)  # [1 + K]
    present = int((counts > 0).sum())
    mine = row_group[first_row:first_row + rows]  # [B]
    weights = (scale / (present * counts[mine])).to(torch.float32)  # [B]
    return StepPlan(tuple(sizes), mine, weights)


def settles(config: FitConfig, step: int) -> bool:
    """Whether ``step`` is one of the last ``settle_steps``: the guide frozen, the LM trained
    on the deployed masks alone."""
    return step >= config.steps - config.settle_steps


def holds(config: FitConfig, step: int) -> bool:
    """Whether ``step`` is one of the first ``hold_steps``: the guide held at its start, the
    LM trained on the start's deployed masks alone."""
    return step < config.hold_steps


def guide_frozen(config: FitConfig, step: int) -> bool:
    """Whether the guide is frozen at ``step`` (it holds or settles) and the rows read the
    deployed masks of its median ranking (:func:`deployed_gates`)."""
    return holds(config, step) or settles(config, step)


def averaging(config: FitConfig, step: int) -> bool:
    """Whether ``step`` is one of the ``average_steps`` steps before the first settling step,
    whose guides are averaged."""
    first = config.steps - config.settle_steps
    return config.average_steps > 0 and first - config.average_steps <= step < first


@torch.no_grad()
def average_guide(state: FitState, step: int) -> None:
    """Polyak averaging before the fit settles (``average_steps``): after each averaged
    ``step`` the guide's parameters are added to ``state.guide_sum``; after the last one the
    guide takes their mean, which the settling steps then rank (:func:`deployed_gates`)."""
    if not averaging(state.config, step):
        return
    params = dict(state.guide.named_parameters())
    if state.guide_sum is None:
        state.guide_sum = {name: torch.zeros_like(p) for name, p in params.items()}
    for name, p in params.items():
        state.guide_sum[name].add_(p)
    if not averaging(state.config, step + 1):  # the last averaged step: the guide takes the mean
        for name, p in params.items():
            p.copy_(state.guide_sum[name] / state.config.average_steps)
        state.guide_sum = None


def deployed_gates(state: FitState, sizes: tuple[float, ...], device: torch.device) -> Gates:
    """The masks that ship at each of ``sizes`` (the longest prefixes of the posterior's
    median ranking, :meth:`Ranking.masks`) as gates ``[K, L]``, ``[K, L, U]`` on ``device``.
    The guide does not move while it is frozen (the fit holds or settles), so its ranking is
    read once (again after a resume, from the same guide) and kept in ``state.settled``
    until the guide learns again."""
    if state.settled is None:
        state.settled = Ranking.from_guide(state.guide)
    gates = [state.settled.masks(size).gates(device) for size in sizes]
    return Gates(torch.stack([g.layer for g in gates]), torch.stack([g.unit for g in gates]))


@torch.no_grad()
def teacher_of(state: FitState, input_ids: torch.Tensor) -> Teacher | str | None:
    """The distillation teacher of a batch: the frozen original LM's hidden states and head
    (``teacher='original'``), ``'self'`` (the LM itself with every gate on, read inside the
    step module), or ``None`` without the distillation term."""
    if state.config.distill_weight == 0:
        return None
    if state.teacher is None:
        return "self"
    base = getattr(state.teacher, state.teacher.base_model_prefix)
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, d]
    return Teacher(hidden=hidden, head=state.teacher.get_output_embeddings().weight)


def _autocast(config: FitConfig, device: torch.device):
    if config.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, config.autocast))


def train_step(state: FitState, batches, *, context, device: torch.device) -> torch.Tensor:
    """Run step ``state.step`` on ``batches`` (``accumulate`` micro-batches ``[B, T]`` of this
    process, on ``device``) and update the parameters. Returns the step's figures on the
    device, averaged over processes, without a host sync: ``[loss, Σ w·NLL of group 0 .. K,
    Σ w·KL of group 0 .. K, Σ w of group 0 .. K, realised size of each of the K gated sizes]``
    (group 0: the rows the full LM read; group k: the k-th gated size; ``w`` the row
    weights, so a group's mean is its ``Σ w·x / Σ w``)."""
    config, step = state.config, state.step
    micro = config.accumulate
    factor = lr_factor(config.lr_schedule, step, config.steps, config.warmup_steps)
    frozen = guide_frozen(config, step)
    if not frozen:
        state.settled = None  # the hold's ranking is not the one the fit later settles on
    group(state.optimizer, "guide")["lr"] = 0.0 if frozen else config.lr_guide * factor
    if config.train_lm:  # the LM's weights wait for the first freeze_lm_steps steps
        group(state.optimizer, "lm")["lr"] = 0.0 if step < config.freeze_lm_steps else config.lr_lm * factor
    state.optimizer.zero_grad(set_to_none=True)
    B = config.batch_size
    global_rows = B * micro * context.world_size
    summed = None
    for k, input_ids in enumerate(batches):
        # Seeds are global: every process and micro-batch draws the same sizes and gates.
        seeds.seed_gates(config.seed, step)
        plan = step_plan(config, step, rows=B, first_row=(context.rank * micro + k) * B, global_rows=global_rows,
                         scale=context.world_size * micro)
        plan = StepPlan(plan.sizes, plan.groups.to(device, non_blocking=True),
                        plan.row_weights.to(device, non_blocking=True))
        gates = deployed_gates(state, plan.sizes, device) if frozen else None
        last = k == micro - 1
        with _autocast(config, device):
            teacher = teacher_of(state, input_ids)
            with contextlib.nullcontext() if last else context.no_sync(state.runner):
                loss = state.runner(input_ids, plan, teacher, gates) / micro
                loss.backward()
        del teacher
        part = _figures(state.model, plan, loss.detach(), micro)
        summed = part if summed is None else summed + part
    figures = context.mean(summed)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in state.optimizer.param_groups for p in g["params"]],
                                       config.grad_clip)
    state.optimizer.step()
    return figures


def _figures(model: PuppetModel, plan: StepPlan, loss: torch.Tensor, micro: int) -> torch.Tensor:
    """This micro-batch's share of the step's figures (see :func:`train_step`): summed over
    micro-batches and averaged over processes they give the step's. Per group, the rows'
    weighted sums ``Σ w·NLL``, ``Σ w·KL`` and ``Σ w``, whose ratios are the group's means; the
    realised sizes (the same in every micro-batch) over ``micro``."""
    rows, groups, w = model.last_rows, plan.groups, plan.row_weights.double()
    slots = torch.zeros(len(plan.sizes) + 1, dtype=torch.float64, device=groups.device)  # group 0 and one per size
    nll = slots.index_add(0, groups, rows.nll.double() * w)
    kl = slots.index_add(0, groups, rows.kl.double() * w)
    weight = slots.index_add(0, groups, w)
    realised = model.last_realised_size.double() / micro  # [K]
    return torch.cat([loss.double()[None], nll, kl, weight, realised]).float()
