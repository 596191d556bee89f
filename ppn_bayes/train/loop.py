"""Fitting: the guide and the LM's weights in one torch training loop.

``Trace_ELBO()(model, guide)`` is a torch module (Pyro's module-local parameters; here
:class:`~ppn_bayes.core.model.PuppetELBO`, the same ELBO without host syncs), trained with a
stock torch optimizer, as in Pyro's ``examples/svi_torch.py``. :func:`fit` reads as the
story of a fit: build, resume, then for each step train (:func:`~ppn_bayes.train.step.train_step`),
log, evaluate, save.

Data and sampling are pure functions of ``(seed, step)`` (:mod:`ppn_bayes.train.seeds`), so
a run resumed from a checkpoint gives the same result as one that never stopped.

The same loop runs as one process or under ``torchrun --nproc-per-node N``
(:mod:`ppn_bayes.distributed`): each process takes its own rows of one global batch and
draws the same sizes and gates, so ``N`` processes of batch ``B`` follow the
single-process fit of batch ``N·B``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from pathlib import Path

import pyro
import torch
from torch import nn

from .. import distributed
from ..core.adapters import SizeAdapters, check_adaptable
from ..core.architecture import Architecture, decoder_layers, describe
from ..core.config import FitConfig
from ..data import TokenBlocks
from ..io import FileFormatError, recover_directory
from ..store import TokenSource
from ..transfer import Readback, to_device
from . import checkpoint as ckpt
from .state import (FitResult, FitState, PuppetFit, build_adapters, build_guide, build_model, build_optimizer,
                    copy_frozen)
from .init import activation_start
from .step import StepLoss, average_guide, averaging, step_sizes, train_step

__all__ = ["fit", "load_fit", "data_identity", "TOKENS_PER_PARAMETER", "TrainingBudgetWarning"]


class TrainingBudgetWarning(UserWarning):
    """A fit trains on far fewer tokens than sub-networks of its LM need to recover."""

#: A fit that trains on fewer tokens than this many per parameter of the LM is warned about:
#: the reference distillation of SmolLM2-135M cut to half its decoder (shared/experiments,
#: 2026-12-01) needed 12M tokens, about 0.09 per parameter, to reach 2.8 times the dense
#: perplexity, and 36M to reach 2.4 times.
TOKENS_PER_PARAMETER = 0.05


def data_identity(blocks) -> dict:
    """What identifies the training text: the source's own identity when it has one (a
    mixture of sources, :mod:`ppn_bayes.store`), else that of its token tensor (kind, token
    count, SHA-256)."""
    if hasattr(blocks, "identity"):
        return blocks.identity()
    return TokenSource.from_tensor(blocks.tokens.detach().cpu()).identity()


def fit(
    lm: nn.Module,
    tokens,
    config: FitConfig = FitConfig(),
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    tokenizer=None,
    progress: bool = True,
    eval_tokens: torch.Tensor | None = None,
    on_evaluation=None,
    stop_after: float | None = None,
) -> PuppetFit:
    """Fit the gate posterior and the LM's weights together.

    ``tokens`` is a 1-D token tensor (cut into random windows of ``config.seq_len``),
    :class:`~ppn_bayes.data.TokenBlocks`, or any source of batches with the same
    ``batch(step, batch_size, rank=, world_size=)`` (a mixture of token stores,
    :mod:`ppn_bayes.store`). With ``checkpoint``, the state is written there every
    ``config.checkpoint_every`` steps and at the end; with ``resume=True`` a fit continues
    from the checkpoint found there (the same settings, batch and data; see
    :func:`~ppn_bayes.train.checkpoint.check_resumable`). Returns a :class:`PuppetFit`.

    ``eval_tokens``, a held-out 1-D token tensor, is evaluated every ``config.eval_every``
    steps (0: only at the end) on its first ``config.eval_windows`` windows of
    ``config.seq_len``: the mean next-token NLL of the full LM and of the sub-network at
    ``config.size_min`` under the hard masks of the posterior at that step
    (``result.validation``; the progress bar shows the perplexities).
    Each evaluation's row (see :func:`_validate`) is also passed to ``on_evaluation``
    when given, as soon as it is made.

    ``stop_after`` (seconds): stop at the first step boundary after this long, write the
    checkpoint and return the fit as it stands (``result.steps_done < config.steps``); a
    resume continues it. For machines lent in stretches.

    Under ``torchrun`` (see :mod:`ppn_bayes.distributed` and ``config.parallel``) every
    process calls ``fit`` alike: ``config.batch_size`` is the batch of each process,
    the LM moves to ``cuda:LOCAL_RANK`` (when CUDA is present), rank 0 alone writes the
    checkpoint and shows progress, and every process returns the same fit. After an
    FSDP fit the returned LM is a new, whole module on the CPU.
    """
    blocks = tokens if hasattr(tokens, "batch") else TokenBlocks(tokens, config.seq_len, config.seed)
    if getattr(blocks, "seq_len", config.seq_len) != config.seq_len:
        raise ValueError(f"token blocks of {blocks.seq_len} tokens, but config.seq_len={config.seq_len}")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    state = None
    if resume:
        if checkpoint is not None:
            recover_directory(checkpoint)  # the newest complete checkpoint after a crash at any point
        if checkpoint is None or not (checkpoint / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {checkpoint}")
        state = ckpt.read_state(checkpoint)
    if eval_tokens is not None:  # checked now, cut to the windows evaluated
        windows = TokenBlocks(torch.as_tensor(eval_tokens), config.seq_len).windows(config.eval_windows)
        eval_tokens = windows.flatten()
    if config.teacher == "original" and config.train_lm and config.parallel == "fsdp":
        raise ValueError("teacher='original' keeps a whole frozen copy of the LM in every process and is not "
                         "available with parallel='fsdp'; use teacher='self' or parallel='ddp'")
    for name in ("hold_steps", "settle_steps"):
        if getattr(config, name) and config.parallel == "fsdp":
            raise ValueError(f"{name} is not available with parallel='fsdp' (the ranking is read from the whole "
                             f"guide every process holds); use parallel='ddp' or {name}=0")
    if config.size_rank and config.parallel == "fsdp":
        raise ValueError("size adapters (size_rank > 0) are not available with parallel='fsdp' (the adapters are "
                         "not sharded); use parallel='ddp' or size_rank=0")
    if config.size_rank:
        check_adaptable(lm)
    if config.compile != "none" and config.parallel == "fsdp":
        raise ValueError("compile is not available with parallel='fsdp'; use compile='none' or parallel='ddp'")
    context = distributed.setup(config.parallel, next(lm.parameters()).device)
    if eval_tokens is not None and context.parallel == "fsdp":
        raise ValueError("held-out evaluation during a fit (eval_tokens) is not available with parallel='fsdp' "
                         "yet; evaluate the fitted sub-networks afterwards (ppn-bayes eval)")
    data = data_identity(blocks)
    arch = describe(lm, mlp_group=config.mlp_group)
    opt_state = None
    if state is not None:  # every check and every read before the LM is touched
        ckpt.check_resumable(state, checkpoint, config, arch, context.world_size, data)
        opt_state = ckpt.read_optimizer(checkpoint, state)
    _warn_if_too_few_tokens(lm, config, context.world_size)
    run = _build(lm, config, arch, context, blocks, checkpoint, state, opt_state)
    try:
        # Distribution argument checks would sync the host with the device several times a
        # pass; the loop checks the losses once a step instead (_check_finite).
        with pyro.validation_enabled(False):
            return _loop(run, blocks, context, checkpoint=checkpoint, tokenizer=tokenizer, progress=progress,
                         eval_tokens=eval_tokens, data=data, lm_class=type(lm), on_evaluation=on_evaluation,
                         deadline=None if stop_after is None else time.monotonic() + stop_after)
    finally:  # also when the fit fails: the caller's LM gets no hooks left behind
        run.gated.unload()
        if not config.train_lm:
            lm.requires_grad_(True)


def _warn_if_too_few_tokens(lm: nn.Module, config: FitConfig, world_size: int) -> None:
    n_params = sum(p.numel() for p in lm.parameters())
    tokens = config.steps * config.batch_size * config.accumulate * world_size * config.seq_len
    if tokens < TOKENS_PER_PARAMETER * n_params:
        warnings.warn(
            f"this fit trains on {tokens:,} tokens, {tokens / n_params:.3g} per parameter of the LM "
            f"({n_params:,}); sub-networks of a pretrained LM recover only with far more (the reference "
            f"distillation of SmolLM2-135M to half size needed 12M tokens, 0.09 per parameter, to reach 2.8 times "
            f"the dense perplexity): expect poor sub-networks, or raise steps or batch_size",
            TrainingBudgetWarning, stacklevel=3)


def _build(lm, config: FitConfig, arch: Architecture, context, blocks, checkpoint, state, opt_state) -> FitState:
    """The modules, the optimizer and the teacher, restored from ``checkpoint`` when resuming."""
    device = context.device
    sharded = context.parallel == "fsdp"
    teacher, fingerprint = None, None
    if config.teacher == "original" and config.train_lm:  # a frozen copy of the LM as given
        fingerprint = ckpt.weights_fingerprint(lm)
        if state is not None and state.get("teacher_fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {checkpoint} was fitted with teacher='original' from other weights than "
                             f"this LM's: resume with the LM the fit started from")
        teacher = copy_frozen(lm).to(device)
        if config.autocast != "none":  # the teacher runs in the forward passes' precision, weights included
            teacher.to(getattr(torch, config.autocast))
        if config.compile != "none":
            base = getattr(teacher, teacher.base_model_prefix)
            base.forward = torch.compile(base.forward, dynamic=False, backend=config.compile)
    if context.parallel == "ddp":
        lm.to(device)
    start = None
    if state is None and config.init == "activation":  # a resume reads the ordered LM from its checkpoint
        start = activation_start(lm, arch, blocks, batch_size=config.batch_size)
    gated, model, guide, _ = build_model(lm, config, arch, prior_tokens=blocks_numel(blocks),
                                         device=None if sharded else device)
    if start is not None:
        with torch.no_grad():
            guide.loc_unit.add_(start.to(guide.loc_unit))
    try:
        return _restore_and_wrap(lm, config, arch, context, gated, model, guide, teacher, fingerprint, checkpoint,
                                 state, opt_state)
    except BaseException:  # a refused checkpoint leaves the caller's LM as it was
        gated.unload()
        if not config.train_lm:
            lm.requires_grad_(True)
        raise


def _restore_and_wrap(lm, config, arch, context, gated, model, guide, teacher, fingerprint, checkpoint, state,
                      opt_state) -> FitState:
    if not config.train_lm:
        lm.requires_grad_(False)
    run = FitState(config=config, arch=arch, lm=lm, gated=gated, model=model, guide=guide, optimizer=None,
                   runner=None, teacher=teacher, teacher_fingerprint=fingerprint)
    if state is not None:
        if averaging(config, state["step"] - 1) and averaging(config, state["step"]):  # stopped while averaging
            run.guide_sum = ckpt.read_guide_sum(checkpoint, guide)  # read and checked before the weights load
        ckpt.restore_modules(checkpoint, lm, guide, gated.adapters)
        run.step, run.history, run.validation = state["step"], state["history"], list(state.get("validation", []))
    if config.compile != "none":
        model.compile(config.compile)
    # Ablations leave some guide parameters without gradient (the layer scales without
    # the hierarchy, the log-scales of a point posterior), and so do holding and settling
    # steps (the whole guide): DDP must be told.
    unused = not (config.hierarchy and config.posterior == "normal") or config.settle_steps > 0 \
        or config.hold_steps > 0
    run.runner = distributed.wrap(StepLoss(model, guide), decoder_layers(lm), context, find_unused_parameters=unused)
    run.optimizer = build_optimizer(lm, guide, config, gated.adapters)
    if opt_state is not None:
        ckpt.restore_optimizer(run.optimizer, opt_state, checkpoint)
    return run


def blocks_numel(blocks) -> int:
    """Tokens in the training text (the prior's default ``prior_tokens``)."""
    return int(blocks.numel()) if hasattr(blocks, "numel") else int(blocks.tokens.numel())


def _batches(blocks, config: FitConfig, step: int, context, device: torch.device) -> list[torch.Tensor]:
    """This process's ``accumulate`` micro-batches of ``step``: micro-batch ``k`` of rank ``r``
    takes the rows that rank ``r · accumulate + k`` of ``accumulate`` times as many processes
    would, so any split of the global batch gives the same step."""
    micro = config.accumulate
    out = []
    for k in range(micro):
        input_ids = blocks.batch(step, config.batch_size, rank=context.rank * micro + k,
                                 world_size=context.world_size * micro)
        out.append(to_device(input_ids, device))  # [B, T]
    return out


def _loop(run: FitState, blocks, context, *, checkpoint, tokenizer, progress, eval_tokens, data,
          lm_class, on_evaluation=None, deadline: float | None = None) -> PuppetFit:
    config, lm = run.config, run.lm
    device = torch.device(context.device)
    tokens_per_step = config.batch_size * config.accumulate * config.seq_len * context.world_size
    start = run.step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from tqdm.auto import tqdm

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not (progress and context.is_main), desc="fit", unit="step")
    log = _Log(run, config, bar)
    lm.train()
    began = time.perf_counter()
    stopped = None  # the step a stop_after deadline ended the run at
    for step in bar:
        run.step = step
        figures = train_step(run, _batches(blocks, config, step, context, device), context=context, device=device)
        average_guide(run, step)
        log.push(step, figures, began)  # read one step late: the host queues the next step meanwhile
        done = step + 1
        if eval_tokens is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
            log.flush(began)
            row = _validate(lm, run.guide, eval_tokens, config, done, run.validation[-1] if run.validation else None,
                            adapters=run.gated.adapters)
            run.validation.append(row)
            log.show(ppl_full=f"{math.exp(row['nll_full']):.1f}",
                     **{f"ppl_{r['size']:g}": f"{math.exp(r['nll']):.1f}" for r in row["sizes"]})
            if on_evaluation is not None:
                on_evaluation(row)
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < config.steps:
            log.flush(began)
            _save(run, context, checkpoint, done, tokenizer, data, lm_class)
        if deadline is not None and done < config.steps and _past(deadline, context, device, done, config.log_every):
            stopped = done
            break
    log.flush(began)
    bar.close()
    seconds = time.perf_counter() - began
    end = config.steps if stopped is None else stopped
    run.step = end
    lm.eval()
    run.gated.unload()
    if checkpoint is not None:
        _save(run, context, checkpoint, end, tokenizer, data, lm_class)
    guide = run.guide
    if context.parallel == "fsdp":
        lm, guide = _gather_plain(lm, guide, lm_class, config, run.arch)
    steps_run = end - start
    result = FitResult(
        config=config.to_dict(), architecture=run.arch.to_dict(), history=run.history, validation=run.validation,
        steps_done=end, train_tokens=end * tokens_per_step, seconds=seconds,
        tokens_per_s=steps_run * tokens_per_step / seconds if seconds > 0 else 0.0, device=str(device),
        checkpoint=str(checkpoint) if checkpoint is not None else None, world_size=context.world_size,
        parallel=context.parallel, step_times=run.step_times, data=data,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        checkpoint_bytes=run.checkpoint_bytes,
    )
    return PuppetFit(lm=lm, guide=guide, config=config, result=result, adapters=run.gated.adapters)


def _past(deadline: float, context, device: torch.device, done: int, every: int) -> bool:
    """Whether this process (alone) is past ``deadline`` (``time.monotonic()``); under
    torchrun, whether any process is, asked every ``every`` steps only (a collective), so
    that all stop at the same step."""
    now = time.monotonic()
    if not context.distributed:
        return now > deadline
    if done % every:
        return False
    late = torch.tensor([1.0 if now > deadline else 0.0], device=device)
    return bool(context.mean(late).item() > 0)


class _Log:
    """The step's figures, read back one step late from a copy the device makes on its own
    (an event marks it done): the host queues step ``s + 1`` while the device still runs step
    ``s``. A non-finite loss stops the fit one step late, naming the step it came from."""

    def __init__(self, run: FitState, config: FitConfig, bar):
        self.run, self.config, self.bar = run, config, bar
        self.pending: list = []
        self.postfix: dict = {}  # the bar's figures: the latest step's losses and held-out perplexities

    def push(self, step: int, figures: torch.Tensor, began: float) -> None:
        figures = Readback(figures)  # queued before the wait for the step before
        self.flush(began)
        self.pending.append((step, step_sizes(self.config, step), figures))

    def flush(self, began: float) -> None:
        if not self.pending:
            return
        step, sizes, figures = self.pending.pop()
        values = figures.tolist()
        n = len(sizes) + 1  # group 0 (the full LM), then one per gated size
        loss, realised = values[0], values[1 + 3 * n:]
        weight = values[1 + 2 * n:1 + 3 * n]
        nll = [x / w if w > 0 else None for x, w in zip(values[1:1 + n], weight)]  # group means
        kl = [x / w if w > 0 else None for x, w in zip(values[1 + n:1 + 2 * n], weight)]
        nll_full = nll[0]
        _check_finite([loss, *([nll_full] if nll_full is not None else [])], step)
        self.run.step_times.append(time.perf_counter() - began)
        if step % self.config.log_every == 0 or step == self.config.steps - 1:
            row = {"step": step, "loss": loss, "nll_full": nll_full, "sizes": sizes, "realised": realised,
                   "nll": nll[1:], "kl": kl[1:], "kl_full": kl[0]}
            self.run.history.append(row)
        self.show(loss=f"{loss:.3f}", **({"nll_full": f"{nll_full:.3f}"} if nll_full is not None else {}))

    def show(self, **figures) -> None:
        """Update the progress bar's figures (every step: the values are on the host already)."""
        self.postfix.update(figures)
        self.bar.set_postfix(self.postfix, refresh=False)


def _check_finite(values: list[float], step: int) -> None:
    for value, what in zip(values, ["the loss", "the full LM's NLL"]):
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{what} became {value} at step {step}; lower lr_lm / lr_guide or check the data"
            )


def _save(run: FitState, context, checkpoint: Path, step: int, tokenizer, data: dict, lm_class: type) -> None:
    full = {}
    if context.parallel == "fsdp":  # every process takes part in gathering the shards; rank 0 keeps them
        keep = context.is_main
        full = dict(lm_state_dict=distributed.full_state_dict(run.lm, keep=keep),
                    guide_state_dict=distributed.full_state_dict(run.guide, keep=keep),
                    optimizer_state=distributed.full_optimizer_state(run.optimizer, keep=keep), lm_class=lm_class)
    context.barrier()
    if context.is_main:
        ckpt.save_checkpoint(checkpoint, lm=run.lm, guide=run.guide, optimizer=run.optimizer, step=step,
                             config=run.config, arch=run.arch, history=run.history, validation=run.validation,
                             tokenizer=tokenizer, world_size=context.world_size,
                             teacher_fingerprint=run.teacher_fingerprint, data=data, guide_sum=run.guide_sum,
                             adapters=run.gated.adapters, **full)
        run.checkpoint_bytes = checkpoint_sizes(checkpoint)
    context.barrier()


def checkpoint_sizes(path: Path) -> dict:
    """Bytes of a checkpoint's parts: ``lm``, ``guide``, ``optimizer``, ``state`` and ``total``."""
    parts = {"lm": path / "lm", "guide": path / "guide.safetensors", "optimizer": path / "optimizer.safetensors",
             "state": path / "state.json"}
    sizes = {name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir()
             else (p.stat().st_size if p.exists() else 0) for name, p in parts.items()}
    return {**sizes, "total": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}


#: Posterior draws behind each evaluation's share of ambiguous units.
DIAGNOSTIC_DRAWS = 32
#: A unit is ambiguous at a size when the share of posterior draws whose deployed mask keeps
#: it lies strictly between these.
AMBIGUOUS = (0.1, 0.9)


def eval_sizes(config: FitConfig) -> tuple[float, ...]:
    """The sizes evaluated during a fit: ``config.eval_sizes``, or ``size_min``."""
    return tuple(config.eval_sizes) or (config.size_min,)


def _validate(lm: nn.Module, guide, tokens: torch.Tensor, config: FitConfig, step: int,
              previous: dict | None, adapters: SizeAdapters | None = None) -> dict:
    """One evaluation during a fit, the same on every process.

    ``nll_full``: the held-out mean next-token NLL of the full LM on ``tokens`` (whole
    windows of ``seq_len``), by the perplexity harness. For each of :func:`eval_sizes`, a row
    of ``sizes``: ``nll`` of the deployed sub-network (the LM sliced to the longest prefix of
    the posterior median's ranking, as ``ppn-bayes resize`` builds it), ``size_reached``,
    ``kept`` (those masks as a string of 0 and 1, the layers then the units); ``stability``, the share of the units and layers kept now or
    at the ``previous`` evaluation that both keep (Jaccard; ``None`` at the first);
    ``ambiguous``, the share of units and layers whose inclusion frequency in the deployed
    masks of ``DIAGNOSTIC_DRAWS`` posterior draws lies inside ``AMBIGUOUS`` (0 when the
    posterior has settled on one mask at this size). With size ``adapters`` every LM evaluated
    is the one that ships: the correction of its size merged into the weights (size 1 for the
    full LM), the LM's own weights restored afterwards."""
    from ..inspect.evaluate import perplexity
    from ..core.ranking import Ranking, flat_from_marks
    from ..deploy.subnetwork import build_subnetwork

    ranking = Ranking.from_guide(guide)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    draws_layer, draws_unit = guide.sample_log_lambda(DIAGNOSTIC_DRAWS, generator=generator)
    drawn = [Ranking.from_log_lambda(guide.arch, draws_layer[i], draws_unit[i]) for i in range(DIAGNOSTIC_DRAWS)]
    device = next(lm.parameters()).device
    with torch.autocast(device.type, enabled=False), _merged(adapters, lm, 1.0):  # the weights' precision
        full = perplexity(lm, tokens, seq_len=config.seq_len, batch_size=config.batch_size)
    before = {row["size"]: row for row in (previous or {}).get("sizes", [])}
    rows = []
    for size in eval_sizes(config):
        masks = ranking.masks(size)
        kept = masks.flat()
        with torch.autocast(device.type, enabled=False), _merged(adapters, lm, size):  # as it ships
            small = perplexity(build_subnetwork(lm, masks), tokens, seq_len=config.seq_len,
                               batch_size=config.batch_size)
        frequency = torch.stack([r.masks(size).flat() for r in drawn]).double().mean(0)
        ambiguous = ((frequency > AMBIGUOUS[0]) & (frequency < AMBIGUOUS[1])).double().mean().item()
        stability = None
        if size in before:
            then = flat_from_marks(before[size]["kept"])
            stability = int((kept & then).sum()) / max(1, int((kept | then).sum()))
        rows.append({"size": size, "size_reached": masks.size_reached, "nll": small.nll, "stability": stability,
                     "ambiguous": ambiguous, "kept": masks.marks()})
    return {"step": step, "nll_full": full.nll, "windows": full.windows, "sizes": rows}


def _merged(adapters: SizeAdapters | None, lm: nn.Module, size: float):
    """``lm`` with the adapters' correction of ``size`` merged inside the block (restored to the
    bit after); a no-op without adapters."""
    return contextlib.nullcontext() if adapters is None else adapters.merged(lm, size)


def _gather_plain(lm, guide, lm_class: type, config: FitConfig, arch: Architecture):
    """Whole CPU copies of a sharded LM and guide (every process takes part)."""
    lm_state = distributed.full_state_dict(lm)
    guide_state = distributed.full_state_dict(guide)
    dtype = next(iter(lm_state.values())).dtype
    plain = lm_class(copy.deepcopy(lm.config)).to(dtype)
    plain.load_state_dict(lm_state)
    plain_guide = build_guide(config, arch, prior_scale=1.0)
    plain_guide.load_state_dict(guide_state)
    return plain.eval(), plain_guide


def load_fit(path: str | Path, *, device: str | torch.device = "cpu", dtype=torch.float32) -> PuppetFit:
    """A :class:`PuppetFit` from a checkpoint directory written by :func:`fit`.

    Checkpoints hold whole tensors, whatever number of processes wrote them.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(path)
    state = ckpt.read_state(path)
    config = FitConfig.from_dict(state["config"])
    if not (path / "lm" / "config.json").is_file():
        raise FileFormatError(f"checkpoint {path}: lm/config.json is missing")
    if not (path / "lm" / "model.safetensors").is_file():
        raise FileFormatError(f"checkpoint {path}: lm/model.safetensors is missing")
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path / "lm"), dtype=dtype).to(device).eval()
    except (OSError, ValueError, SafetensorError) as err:
        raise FileFormatError(f"checkpoint {path}: the LM does not load ({err})") from None
    arch = describe(lm, mlp_group=config.mlp_group)
    if ckpt.recorded_architecture(state, path) != arch:
        raise FileFormatError(f"checkpoint {path}: the LM does not match the recorded architecture")
    guide = build_guide(config, arch, prior_scale=1.0)
    try:
        guide.load_state_dict(ckpt.load_tensors(path / "guide.safetensors"))
    except RuntimeError as err:
        raise FileFormatError(f"checkpoint {path}: guide.safetensors does not fit ({err})") from None
    guide.to(device)
    adapters = build_adapters(lm, config)
    if adapters is not None:
        ckpt.restore_adapters(path, adapters)
    result = FitResult(config=state["config"], architecture=state["architecture"], history=state["history"],
                       validation=state.get("validation", []), steps_done=state["step"], checkpoint=str(path),
                       versions=state.get("versions", {}), data=state.get("data"))
    return PuppetFit(lm=lm, guide=guide, config=config, result=result, adapters=adapters)
