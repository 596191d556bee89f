"""Fitting: the guide and the LM's weights in one torch training loop.

``Trace_ELBO()(model, guide)`` is a torch module (Pyro's module-local parameters; here
:class:`~ppn_bayes.model.PuppetELBO`, the same ELBO without host syncs), trained
with a stock torch optimizer, as in Pyro's ``examples/svi_torch.py``. Each step follows
the sandwich rule: the full LM (all gates on) trains on the next-token loss and serves as
the distillation teacher; then the ELBO is taken at the smallest size and at random sizes
between, and its gradients reach the guide (through the relaxed gates and the push τ) and
the LM's weights.

Data and sampling are pure functions of ``(seed, step)``, so a run resumed from a
checkpoint gives the same result as one that never stopped.

The same loop runs as one process or under ``torchrun --nproc-per-node N``
(:mod:`ppn_bayes.distributed`): every pass of a step (the teacher, then the ELBO at each
size) is one forward and one backward of :class:`StepLoss`, the module that DDP or FSDP2
wraps. Each process takes its own rows of one global batch and draws the same sizes and
gates (the per-step seeds are global), so ``N`` processes of batch ``B`` follow the
single-process fit of batch ``N·B``. Gradients accumulate over the passes of a step and
are averaged across processes once, in the last backward (DDP's ``no_sync``); FSDP
reduce-scatters after every pass so that only gradient shards are kept.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from . import distributed
from .architecture import Architecture, decoder_layers, describe
from .config import FitConfig
from .data import TokenBlocks
from .gating import GatedLM
from .io import FileFormatError, atomic_directory, atomic_write_text, read_json
from .model import PuppetELBO, PuppetGuide, PuppetModel, distillation_kl

__all__ = ["fit", "FitResult", "PuppetFit", "StepLoss", "load_fit", "save_checkpoint", "read_state", "versions"]

CHECKPOINT_FORMAT = "ppn_bayes.checkpoint"
CHECKPOINT_VERSION = 1


def versions() -> dict:
    """Versions of what a result depends on."""
    import transformers

    return {
        "ppn_bayes": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
    }


@dataclass
class FitResult:
    """The record of a fit: settings, losses, cost, versions.

    ``history`` holds the losses every ``log_every`` steps, averaged over processes, with
    the sizes the step trained (``sizes``: the smallest, then the random ones) and the
    sizes its gates actually kept (``realised``: one draw per size, averaged over
    micro-batches);
    ``validation`` the held-out next-token NLL (see :func:`fit`'s ``eval_tokens``).
    ``train_tokens`` and ``tokens_per_s`` count the global batch (all processes);
    ``seconds`` is the wall time of the training loop of this call and ``step_times``
    the time since that loop began at which each step it ran was finished (its losses
    read back from the device).
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
    """A fitted push puppet network: the LM (point estimate) and the guide ``q(log λ)``."""

    lm: nn.Module
    guide: PuppetGuide
    config: FitConfig
    result: FitResult

    @property
    def arch(self) -> Architecture:
        """The units and costs of the LM (see :mod:`ppn_bayes.architecture`)."""
        return self.guide.arch

    def ranking(self):
        """The deterministic ranking of layers and units (see :mod:`ppn_bayes.ranking`)."""
        from .ranking import Ranking

        return Ranking.from_guide(self.guide)

    def masks(self, size: float):
        """Hard masks for ``size``: the longest prefix of the ranking within budget."""
        return self.ranking().masks(size)


def _guide(config: FitConfig, arch: Architecture, prior_scale: float) -> PuppetGuide:
    return PuppetGuide(
        arch, hierarchy=config.hierarchy, prior_scale=prior_scale, temperature=config.temperature,
        posterior=config.posterior, init_scale=config.init_scale, layer_init=config.layer_init,
        gate_coupling=config.gate_coupling, init_jitter=config.init_jitter, seed=config.seed,
    )


def _build(lm: nn.Module, config: FitConfig, arch: Architecture, prior_tokens: int, device: torch.device | None):
    """Gated LM, model and guide; ``device=None`` leaves them where they are (FSDP moves shards)."""
    pyro.settings.set(module_local_params=True)
    gated = GatedLM(lm, arch)
    prior_scale = config.prior_weight / (config.prior_tokens or prior_tokens)
    model = PuppetModel(gated, hierarchy=config.hierarchy, prior_scale=prior_scale,
                        temperature=config.temperature, distill_weight=config.distill_weight,
                        gate_coupling=config.gate_coupling)
    guide = _guide(config, arch, prior_scale)
    if device is not None:
        model, guide = model.to(device), guide.to(device)
    return gated, model, guide, prior_scale


def _optimizer(lm: nn.Module, guide: PuppetGuide, config: FitConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(guide.parameters()), "lr": config.lr_guide, "weight_decay": 0.0}]
    if config.train_lm:
        groups.append({"params": [p for p in lm.parameters() if p.requires_grad], "lr": config.lr_lm,
                       "weight_decay": config.weight_decay})
    return torch.optim.AdamW(groups)


# -- checkpoints: safetensors for tensors, JSON for the rest ---------------------------------
def _optimizer_tensors(opt_state: dict) -> dict:
    return {
        f"state.{index}.{key}": value.detach().cpu().contiguous()
        for index, state in opt_state["state"].items()
        for key, value in state.items()
    }


def _write_lm(directory: Path, lm: nn.Module, state_dict: dict, lm_class: type) -> None:
    """A Hugging Face directory from full tensors, for an LM whose own module is sharded
    (its class is FSDP's, so ``save_pretrained`` would record the wrong architecture)."""
    directory.mkdir(parents=True)
    config = copy.deepcopy(lm.config)
    config.architectures = [lm_class.__name__]
    config.save_pretrained(directory)
    generation = getattr(lm, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    seen, tensors = set(), {}
    for name, tensor in state_dict.items():  # tied names share one tensor: keep the first
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def save_checkpoint(path, *, lm, guide, optimizer, step, config, arch, history, validation=(), tokenizer=None,
                    overwrite: bool = True, world_size: int = 1, lm_state_dict: dict | None = None,
                    guide_state_dict: dict | None = None, optimizer_state: dict | None = None,
                    lm_class: type | None = None, teacher_fingerprint: str | None = None) -> Path:
    """Write a fit's checkpoint directory atomically.

    Layout: ``lm/`` (a Hugging Face directory, one ``model.safetensors``),
    ``guide.safetensors``, ``optimizer.safetensors`` and ``state.json`` (format, version,
    step, settings, architecture, loss history, held-out NLL, optimizer groups, and the number of
    processes ``world_size`` whose batches of ``config.batch_size`` made a step; with
    ``FitConfig.teacher='original'``, the ``teacher_fingerprint`` of the LM the fit started
    from, which a resumed fit checks its LM against).

    The ``*_state_dict`` / ``optimizer_state`` arguments replace the modules' own states
    with full tensors gathered from a sharded fit (see
    :func:`ppn_bayes.distributed.full_state_dict`); ``lm_class`` is then the LM's class
    before sharding. Every tensor is written whole, so the checkpoint loads in any
    number of processes.
    """
    opt = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    guide_tensors = guide_state_dict if guide_state_dict is not None else guide.state_dict()
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "step": step,
        "world_size": world_size,
        "config": config.to_dict(),
        "architecture": arch.to_dict(),
        "history": history,
        "validation": list(validation),
        "optimizer_groups": opt["param_groups"],
        "versions": versions(),
    }
    if teacher_fingerprint is not None:
        state["teacher_fingerprint"] = teacher_fingerprint
    with atomic_directory(path, overwrite=overwrite) as tmp:
        if lm_state_dict is None:
            lm.save_pretrained(tmp / "lm", max_shard_size="100000GB")
        else:
            _write_lm(tmp / "lm", lm, lm_state_dict, lm_class or type(lm))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "lm")
        save_file({k: v.detach().cpu().contiguous() for k, v in guide_tensors.items()}, tmp / "guide.safetensors")
        save_file(_optimizer_tensors(opt), tmp / "optimizer.safetensors")
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    return Path(path)


def read_state(path) -> dict:
    """``state.json`` of a checkpoint, checked for format and version."""
    state = read_json(Path(path) / "state.json", "checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path} is not a ppn_bayes checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise FileFormatError(
            f"{path} is checkpoint format version {state.get('format_version')}; this ppn_bayes "
            f"({__version__}) reads version {CHECKPOINT_VERSION}"
        )
    for key in ("step", "config", "architecture", "history", "optimizer_groups"):
        if key not in state:
            raise FileFormatError(f"checkpoint {path}: state.json lacks '{key}'")
    return state


def _recorded_architecture(state: dict, path) -> Architecture:
    """The architecture a checkpoint records (JSON turned its tuples into lists)."""
    try:
        return Architecture.from_dict(state["architecture"])
    except (ValueError, TypeError, KeyError) as err:
        raise FileFormatError(f"checkpoint {path}: state.json has a malformed architecture ({err})") from None


def _load_tensors(file: Path) -> dict:
    if not file.is_file():
        raise FileFormatError(f"checkpoint: {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"checkpoint: {file} is corrupt ({err})") from None


def _read_optimizer(path: Path, state: dict) -> dict:
    """The optimizer state of a checkpoint, index-keyed as ``Optimizer.state_dict`` has it."""
    opt_state: dict = {}
    for name, value in _load_tensors(path / "optimizer.safetensors").items():
        try:
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value
        except ValueError:
            raise FileFormatError(f"checkpoint {path}: optimizer.safetensors holds an unknown entry {name!r}") from None
    return {"state": opt_state, "param_groups": state["optimizer_groups"]}


def _restore_modules(path: Path, lm: nn.Module, guide: PuppetGuide) -> None:
    """Load the LM's and the guide's tensors; every file is read and checked first."""
    from safetensors.torch import load_model

    guide_tensors = _load_tensors(path / "guide.safetensors")
    lm_file = path / "lm" / "model.safetensors"
    if not lm_file.is_file():
        raise FileFormatError(f"checkpoint: {lm_file} is missing")
    try:
        missing, unexpected = load_model(lm, lm_file, strict=False, device=str(next(lm.parameters()).device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FileFormatError(f"checkpoint: {lm_file} does not fit this LM ({err})") from None
    if missing or unexpected:
        raise FileFormatError(f"checkpoint: {lm_file} lacks {missing} / has extra {unexpected}")
    try:
        guide.load_state_dict(guide_tensors)
    except RuntimeError as err:
        raise FileFormatError(f"checkpoint: guide.safetensors does not fit ({err})") from None


def _restore_optimizer(optimizer: torch.optim.Optimizer, opt_state: dict, path: Path) -> None:
    try:
        optimizer.load_state_dict(distributed.shard_optimizer_state(optimizer, opt_state))
    except (ValueError, KeyError, IndexError, RuntimeError) as err:
        raise FileFormatError(f"checkpoint {path}: optimizer.safetensors does not fit ({err})") from None


# -- the loop -------------------------------------------------------------------------------
def _next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def _step_sizes(config: FitConfig, generator: torch.Generator) -> list[float]:
    draws = torch.rand(config.n_random_sizes, generator=generator, dtype=torch.float64)
    between = config.size_min + (config.size_max - config.size_min) * draws
    return [config.size_min, *between.tolist()]


class StepLoss(nn.Module):
    """One pass of a training step, as the single module that DDP or FSDP wraps.

    ``step_loss(input_ids)`` is the full pass: the LM with all gates on, returning its
    logits ``[B, T, V]``, its next-token loss, and the loss it trains on: the next-token
    loss, plus ``distill_weight`` · KL(teacher ‖ full LM) when ``teacher_logits`` (of a
    frozen original, ``FitConfig.teacher='original'``) are given. ``step_loss(input_ids,
    size, teacher_logits)`` is the ELBO pass at ``size``: the negative ELBO per token of
    ``PuppetELBO()(model, guide)`` (Pyro's ``Trace_ELBO``, its value kept on the device).
    Its parameters are the LM's and the guide's.
    """

    def __init__(self, model: PuppetModel, guide: PuppetGuide):
        super().__init__()
        self.elbo = PuppetELBO()(model, guide)  # Trace_ELBO without host syncs; an nn.Module

    def forward(self, input_ids: torch.Tensor, size: float | None = None,
                teacher_logits: torch.Tensor | None = None):
        if size is None:
            logits = self.elbo.model.gated(input_ids)  # [B, T, V]
            nll = _next_token_loss(logits, input_ids)
            weight = self.elbo.model.distill_weight
            if teacher_logits is None or weight == 0:
                return logits, nll, nll
            log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
            return logits, nll, nll + weight * distillation_kl(log_probs, teacher_logits)
        return self.elbo(input_ids, size, teacher_logits)


def _validate(lm: nn.Module, guide: PuppetGuide, tokens: torch.Tensor, config: FitConfig, step: int) -> dict:
    """Held-out mean next-token NLL of the full LM and of the sub-network at ``size_min``
    (hard masks of the posterior now) on ``tokens`` (whole windows of ``seq_len``), by the
    perplexity harness; the same on every process."""
    from .evaluate import perplexity
    from .ranking import Ranking

    masks = Ranking.from_guide(guide).masks(config.size_min)
    full = perplexity(lm, tokens, seq_len=config.seq_len, batch_size=config.batch_size)
    small = perplexity(lm, tokens, seq_len=config.seq_len, batch_size=config.batch_size, masks=masks)
    return {"step": step, "size": config.size_min, "size_reached": masks.size_reached, "nll_full": full.nll,
            "nll_size_min": small.nll, "windows": full.windows}


def _check_finite(values: list[float], sizes: list[float], step: int) -> None:
    for value, what in zip(values, ["the full LM", *(f"size {size:.3f}" for size in sizes)]):
        if not torch.isfinite(torch.tensor(value)):
            raise FloatingPointError(
                f"the loss became {value} at step {step} ({what}); lower lr_lm / lr_guide or check the data"
            )


def fit(
    lm: nn.Module,
    tokens: torch.Tensor | TokenBlocks,
    config: FitConfig = FitConfig(),
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    tokenizer=None,
    progress: bool = True,
    eval_tokens: torch.Tensor | None = None,
) -> PuppetFit:
    """Fit the gate posterior and the LM's weights together.

    ``tokens`` is a 1-D token tensor (cut into random windows of ``config.seq_len``) or
    :class:`~ppn_bayes.data.TokenBlocks`. With ``checkpoint``, the state is written there
    every ``config.checkpoint_every`` steps and at the end; with ``resume=True`` a fit
    continues from the checkpoint found there. Returns a :class:`PuppetFit`.

    ``eval_tokens``, a held-out 1-D token tensor, is evaluated every ``config.eval_every``
    steps (0: only at the end) on its first ``config.eval_windows`` windows of
    ``config.seq_len``: the mean next-token NLL of the full LM and of the sub-network at
    ``config.size_min`` under the hard masks of the posterior at that step
    (``result.validation``; the progress bar shows the perplexities). Training text says
    nothing of the LM drifting from other text; this does.

    Under ``torchrun`` (see :mod:`ppn_bayes.distributed` and ``config.parallel``) every
    process calls ``fit`` alike: ``config.batch_size`` is the batch of each process,
    the LM moves to ``cuda:LOCAL_RANK`` (when CUDA is present), rank 0 alone writes the
    checkpoint and shows progress, and every process returns the same fit. After an
    FSDP fit the returned LM is a new, whole module on the CPU.
    """
    blocks = tokens if isinstance(tokens, TokenBlocks) else TokenBlocks(tokens, config.seq_len, config.seed)
    if blocks.seq_len != config.seq_len:
        raise ValueError(f"token blocks of {blocks.seq_len} tokens, but config.seq_len={config.seq_len}")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    state = None
    if resume:
        if checkpoint is None or not (checkpoint / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {checkpoint}")
        state = read_state(checkpoint)
    if eval_tokens is not None:  # checked now, cut to the windows evaluated
        windows = TokenBlocks(torch.as_tensor(eval_tokens), config.seq_len).windows(config.eval_windows)
        eval_tokens = windows.flatten()
    if config.teacher == "original" and config.train_lm and config.parallel == "fsdp":
        raise ValueError("teacher='original' keeps a whole frozen copy of the LM in every process and is not "
                         "available with parallel='fsdp'; use teacher='self' or parallel='ddp'")
    context = distributed.setup(config.parallel, next(lm.parameters()).device)
    if eval_tokens is not None and context.parallel == "fsdp":
        raise ValueError("held-out evaluation during a fit (eval_tokens) is not available with parallel='fsdp' "
                         "yet; evaluate the fitted sub-networks afterwards (ppn-bayes eval)")
    return _fit(lm, blocks, config, context, checkpoint=checkpoint, state=state, tokenizer=tokenizer,
                progress=progress, eval_tokens=eval_tokens)


def _check_resumable(state: dict, checkpoint: Path, config: FitConfig, arch: Architecture, world_size: int):
    """Refuse a checkpoint of another model, other settings or another global batch."""
    if _recorded_architecture(state, checkpoint) != arch:
        raise FileFormatError(f"checkpoint {checkpoint} is from another model (its architecture differs)")
    saved = FitConfig.from_dict(state["config"])
    # Any number of processes may resume a checkpoint, with the same global batch.
    saved_world = int(state.get("world_size", 1))
    saved_global = saved.batch_size * saved.accumulate * saved_world
    if saved_global != config.batch_size * config.accumulate * world_size:
        raise ValueError(
            f"checkpoint {checkpoint} was fitted with a global batch of {saved_global} sequences (batch_size "
            f"{saved.batch_size} x accumulate {saved.accumulate} x {saved_world} processes); here it would be "
            f"{config.batch_size} x {config.accumulate} x {world_size}: set batch_size or accumulate so that "
            f"the product stays"
        )
    ignore = ("steps", "checkpoint_every", "log_every", "parallel", "batch_size", "accumulate", "eval_every",
              "eval_windows")
    if saved.replace(**{k: getattr(config, k) for k in ignore}) != config:
        raise ValueError(f"checkpoint {checkpoint} was fitted with other settings: {saved}")


def weights_fingerprint(lm: nn.Module) -> str:
    """SHA-256 of the LM's named tensors (names, dtypes, shapes and bytes): which LM a
    fit with ``teacher='original'`` started from."""
    digest = hashlib.sha256()
    for name, tensor in lm.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _original_teacher(lm: nn.Module, config: FitConfig, state: dict | None, checkpoint, device):
    """A frozen copy of ``lm`` as the fit receives it, and its fingerprint, for
    ``teacher='original'`` (``(None, None)`` otherwise: the full LM is the teacher). A
    resumed fit must be given the LM its checkpoint started from."""
    if config.teacher != "original" or not config.train_lm:
        return None, None
    fingerprint = weights_fingerprint(lm)
    if state is not None and state.get("teacher_fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {checkpoint} was fitted with teacher='original' from other weights than "
                         f"this LM's: resume with the LM the fit started from")
    teacher = copy.deepcopy(lm).requires_grad_(False).eval()
    return (teacher.to(device) if device is not None else teacher), fingerprint


def _fit(lm, blocks: TokenBlocks, config: FitConfig, context: distributed.Context, *, checkpoint, state,
         tokenizer, progress: bool, eval_tokens: torch.Tensor | None = None) -> PuppetFit:
    arch = describe(lm, mlp_group=config.mlp_group)
    opt_state = None
    if state is not None:  # every check and every read before the LM is touched
        _check_resumable(state, checkpoint, config, arch, context.world_size)
        opt_state = _read_optimizer(checkpoint, state)
    lm_class = type(lm)
    sharded = context.parallel == "fsdp"
    device = context.device
    teacher, fingerprint = _original_teacher(lm, config, state, checkpoint, device)
    if context.parallel == "ddp":
        lm.to(device)
    gated, model, guide, prior_scale = _build(lm, config, arch, prior_tokens=blocks.tokens.numel(),
                                              device=None if sharded else device)
    try:
        # Distribution argument checks would sync the host with the device several times a
        # pass; the loop checks the losses once a step instead (_check_finite).
        with pyro.validation_enabled(False):
            return _loop(lm, gated, model, guide, blocks, config, context, arch, lm_class, prior_scale,
                         checkpoint=checkpoint, state=state, opt_state=opt_state, tokenizer=tokenizer,
                         progress=progress, eval_tokens=eval_tokens, teacher=teacher, fingerprint=fingerprint)
    finally:  # also when the fit fails: the caller's LM gets no hooks left behind
        gated.unload()
        if not config.train_lm:
            lm.requires_grad_(True)


def _loop(lm, gated, model, guide, blocks, config, context, arch, lm_class, prior_scale, *, checkpoint, state,
          opt_state, tokenizer, progress, eval_tokens=None, teacher=None, fingerprint=None) -> PuppetFit:
    sharded = context.parallel == "fsdp"
    device = context.device
    if not config.train_lm:
        lm.requires_grad_(False)
    history: list[dict] = []
    validation: list[dict] = []
    start = 0
    if state is not None:
        _restore_modules(checkpoint, lm, guide)
        start, history, validation = state["step"], state["history"], list(state.get("validation", []))

    step_loss = StepLoss(model, guide)
    # Ablations leave some guide parameters without gradient (the layer scales without
    # the hierarchy, the log-scales of a point posterior): DDP must be told.
    unused = not (config.hierarchy and config.posterior == "normal")
    runner = distributed.wrap(step_loss, decoder_layers(lm), context, find_unused_parameters=unused)
    optimizer = _optimizer(lm, guide, config)
    if opt_state is not None:
        _restore_optimizer(optimizer, opt_state, checkpoint)

    def save(step: int) -> None:
        full = {}
        if sharded:  # every process takes part in gathering the shards; rank 0 keeps them
            keep = context.is_main
            full = dict(lm_state_dict=distributed.full_state_dict(lm, keep=keep),
                        guide_state_dict=distributed.full_state_dict(guide, keep=keep),
                        optimizer_state=distributed.full_optimizer_state(optimizer, keep=keep), lm_class=lm_class)
        context.barrier()
        if context.is_main:
            save_checkpoint(checkpoint, lm=lm, guide=guide, optimizer=optimizer, step=step, config=config,
                            arch=arch, history=history, validation=validation, tokenizer=tokenizer,
                            world_size=context.world_size, teacher_fingerprint=fingerprint,
                            **full)
        context.barrier()

    tokens_per_step = config.batch_size * config.accumulate * config.seq_len * context.world_size
    step_times: list[float] = []
    lm.train()
    began = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not (progress and context.is_main), desc="fit", unit="step")
    cuda = torch.device(device).type == "cuda"
    # The losses of a step are read one step later, from a copy the device made on its own
    # (an event marks it done): the host queues step s + 1 while the device still runs step
    # s, instead of waiting for it. A non-finite loss stops the fit one step late, naming
    # the step it came from; a checkpoint waits for the step it saves.
    pending: list = []

    def read_losses() -> None:
        """Check and log the pending step's losses (waits for that step only)."""
        if not pending:
            return
        step, sizes, host, event = pending.pop()
        if event is not None:
            event.synchronize()
        parts = host.tolist()
        n = len(sizes)
        _check_finite(parts[:1 + n], sizes, step)
        step_times.append(time.perf_counter() - began)
        if step % config.log_every == 0 or step == config.steps - 1:
            elbo_total = 0.0
            for value in parts[1:1 + n]:
                elbo_total += value
            row = {"step": step, "loss": elbo_total, "nll_full": parts[0], "sizes": sizes,
                   "realised": parts[1 + n:]}
            history.append(row)
            bar.set_postfix(loss=f"{elbo_total:.3f}", nll_full=f"{row['nll_full']:.3f}")

    micro = config.accumulate
    for step in bar:
        generator = torch.Generator().manual_seed(config.seed * 104_729 + step)
        sizes = _step_sizes(config, generator)
        if config.train_lm:  # the LM's weights wait for the first freeze_lm_steps steps
            optimizer.param_groups[1]["lr"] = 0.0 if step < config.freeze_lm_steps else config.lr_lm
        optimizer.zero_grad(set_to_none=True)
        summed = None
        for k in range(micro):
            # Seeds are global: every process and every micro-batch draws the same gates, and
            # micro-batch k of rank r takes the rows that rank r * micro + k of micro times as
            # many processes would: the step is the same for any split of its global batch.
            torch.manual_seed(config.seed * 7919 + step)
            input_ids = blocks.batch(step, config.batch_size, rank=context.rank * micro + k,
                                     world_size=context.world_size * micro)
            if cuda:  # from page-locked memory the copy does not hold the host up
                input_ids = input_ids.pin_memory().to(device, non_blocking=True)  # [B, T]
            else:
                input_ids = input_ids.to(device)  # [B, T]
            # Full size: the LM's own loss, and the teacher for self-distillation: the full
            # LM itself, or the frozen original that the full LM then trains towards too.
            original = None
            if teacher is not None:
                with torch.no_grad():
                    original = teacher(input_ids=input_ids, use_cache=False).logits  # [B, T, V]
            with torch.set_grad_enabled(config.train_lm), context.no_sync(runner):
                full_logits, nll_full, full_loss = runner(input_ids, None, original)  # [B, T, V], [], []
                if config.train_lm:
                    (full_loss / micro).backward()
            teacher_logits = (full_logits if original is None else original).detach()
            del full_logits, original
            # Smallest and random sizes: the ELBO per token, averaged over sizes (and
            # micro-batches). Gradients are averaged across processes in the last backward only.
            losses, realised = [], []
            for index, size in enumerate(sizes):
                last = k == micro - 1 and index == len(sizes) - 1
                with contextlib.nullcontext() if last else context.no_sync(runner):
                    loss = runner(input_ids, size, teacher_logits) / len(sizes)
                    (loss / micro).backward()
                losses.append(loss.detach())
                realised.append(model.last_realised_size)
            del teacher_logits
            part = torch.stack([nll_full.detach(), *losses, *(r.to(loss.dtype) for r in realised)]).float() / micro
            # [1 + 2 · sizes]: the full LM's NLL, the ELBO per size, the size each pass kept
            summed = part if summed is None else summed + part
        parts = context.mean(summed)  # [1 + 2 · sizes]
        if cuda:
            host, event = torch.empty(parts.shape, pin_memory=True), torch.cuda.Event()
            host.copy_(parts, non_blocking=True)
            event.record()
        else:
            host, event = parts, None
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           config.grad_clip)
        optimizer.step()
        read_losses()  # the previous step's
        pending.append((step, sizes, host, event))
        done = step + 1
        evaluate = done == config.steps or (config.eval_every and done % config.eval_every == 0)
        if eval_tokens is not None and evaluate:
            read_losses()
            validation.append(_validate(lm, guide, eval_tokens, config, done))
            bar.set_postfix(ppl_full=f"{math.exp(validation[-1]['nll_full']):.1f}",
                            ppl_size_min=f"{math.exp(validation[-1]['nll_size_min']):.1f}")
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < config.steps:
            read_losses()
            save(done)
    read_losses()
    bar.close()
    seconds = time.perf_counter() - began
    lm.eval()
    gated.unload()
    steps_run = config.steps - start
    if checkpoint is not None:
        save(config.steps)
    if sharded:
        lm, guide = _gather_plain(lm, guide, lm_class, config, arch, prior_scale)
    result = FitResult(
        config=config.to_dict(),
        architecture=arch.to_dict(),
        history=history,
        validation=validation,
        steps_done=config.steps,
        train_tokens=config.steps * tokens_per_step,
        seconds=seconds,
        tokens_per_s=steps_run * tokens_per_step / seconds if seconds > 0 else 0.0,
        device=str(device),
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        world_size=context.world_size,
        parallel=context.parallel,
        step_times=step_times,
    )
    return PuppetFit(lm=lm, guide=guide, config=config, result=result)


def _gather_plain(lm, guide, lm_class: type, config: FitConfig, arch: Architecture, prior_scale: float):
    """Whole CPU copies of a sharded LM and guide (every process takes part)."""
    lm_state = distributed.full_state_dict(lm)
    guide_state = distributed.full_state_dict(guide)
    dtype = next(iter(lm_state.values())).dtype
    plain = lm_class(copy.deepcopy(lm.config)).to(dtype)
    plain.load_state_dict(lm_state)
    plain_guide = _guide(config, arch, prior_scale)
    plain_guide.load_state_dict(guide_state)
    return plain.eval(), plain_guide


def load_fit(path: str | Path, *, device: str | torch.device = "cpu", dtype=torch.float32) -> PuppetFit:
    """A :class:`PuppetFit` from a checkpoint directory written by :func:`fit`.

    Checkpoints hold whole tensors, whatever number of processes wrote them.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    state = read_state(path)
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
    if _recorded_architecture(state, path) != arch:
        raise FileFormatError(f"checkpoint {path}: the LM does not match the recorded architecture")
    guide = _guide(config, arch, prior_scale=1.0)
    try:
        guide.load_state_dict(_load_tensors(path / "guide.safetensors"))
    except RuntimeError as err:
        raise FileFormatError(f"checkpoint {path}: guide.safetensors does not fit ({err})") from None
    guide.to(device)
    result = FitResult(config=state["config"], architecture=state["architecture"], history=state["history"],
                       validation=state.get("validation", []), steps_done=state["step"], checkpoint=str(path),
                       versions=state.get("versions", {}))
    return PuppetFit(lm=lm, guide=guide, config=config, result=result)
