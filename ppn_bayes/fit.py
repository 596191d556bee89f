"""Fitting: the guide and the LM's weights in one torch training loop.

``Trace_ELBO()(model, guide)`` is a torch module (Pyro's module-local parameters), trained
with a stock torch optimizer, as in Pyro's ``examples/svi_torch.py``. Each step follows
the sandwich rule: the full LM (all gates on) trains on the next-token loss and serves as
the distillation teacher; then the ELBO is taken at the smallest size and at random sizes
between, and its gradients reach the guide (through the relaxed gates and the push τ) and
the LM's weights.

Data and sampling are pure functions of ``(seed, step)``, so a run resumed from a
checkpoint gives the same result as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
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
from .architecture import Architecture, describe
from .config import FitConfig
from .data import TokenBlocks
from .gating import GatedLM
from .io import FileFormatError, atomic_directory, atomic_write_text, read_json
from .model import PuppetGuide, PuppetModel

__all__ = ["fit", "FitResult", "PuppetFit", "load_fit", "save_checkpoint", "versions"]

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
    """The record of a fit: settings, losses, cost, versions."""

    config: dict
    architecture: dict
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    train_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    device: str = "cpu"
    checkpoint: str | None = None
    versions: dict = field(default_factory=versions)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
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
    )


def _build(lm: nn.Module, config: FitConfig, arch: Architecture, prior_tokens: int):
    pyro.settings.set(module_local_params=True)
    gated = GatedLM(lm, arch)
    prior_scale = config.prior_weight / (config.prior_tokens or prior_tokens)
    model = PuppetModel(gated, hierarchy=config.hierarchy, prior_scale=prior_scale,
                        temperature=config.temperature, distill_weight=config.distill_weight)
    guide = _guide(config, arch, prior_scale)
    device = next(lm.parameters()).device
    return gated, model.to(device), guide.to(device)


def _optimizer(lm: nn.Module, guide: PuppetGuide, config: FitConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(guide.parameters()), "lr": config.lr_guide, "weight_decay": 0.0}]
    if config.train_lm:
        groups.append({"params": [p for p in lm.parameters() if p.requires_grad], "lr": config.lr_lm,
                       "weight_decay": config.weight_decay})
    return torch.optim.AdamW(groups)


# -- checkpoints: safetensors for tensors, JSON for the rest ---------------------------------
def save_checkpoint(path, *, lm, guide, optimizer, step, config, arch, history, tokenizer=None,
                    overwrite: bool = True) -> Path:
    """Write a fit's checkpoint directory atomically.

    Layout: ``lm/`` (a Hugging Face directory), ``guide.safetensors``,
    ``optimizer.safetensors`` and ``state.json`` (format, version, step, settings,
    architecture, loss history, optimizer groups).
    """
    opt = optimizer.state_dict()
    opt_tensors = {
        f"state.{index}.{key}": value.detach().cpu().contiguous()
        for index, state in opt["state"].items()
        for key, value in state.items()
    }
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "step": step,
        "config": config.to_dict(),
        "architecture": arch.to_dict(),
        "history": history,
        "optimizer_groups": opt["param_groups"],
        "versions": versions(),
    }
    with atomic_directory(path, overwrite=overwrite) as tmp:
        lm.save_pretrained(tmp / "lm")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "lm")
        save_file({k: v.detach().cpu().contiguous() for k, v in guide.state_dict().items()},
                  tmp / "guide.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
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
    for key in ("step", "config", "architecture", "history"):
        if key not in state:
            raise FileFormatError(f"checkpoint {path}: state.json lacks '{key}'")
    return state


def _load_tensors(file: Path) -> dict:
    if not file.is_file():
        raise FileFormatError(f"checkpoint: {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"checkpoint: {file} is corrupt ({err})") from None


def _restore(path: Path, state: dict, lm, guide, optimizer) -> None:
    from safetensors.torch import load_model

    lm_file = path / "lm" / "model.safetensors"
    if not lm_file.is_file():
        raise FileFormatError(f"checkpoint: {lm_file} is missing")
    try:
        missing, unexpected = load_model(lm, lm_file, strict=False, device=str(next(lm.parameters()).device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FileFormatError(f"checkpoint: {lm_file} does not fit this LM ({err})") from None
    if missing or unexpected:
        raise FileFormatError(f"checkpoint: {lm_file} lacks {missing} / has extra {unexpected}")
    guide_tensors = _load_tensors(path / "guide.safetensors")
    try:
        guide.load_state_dict(guide_tensors)
    except RuntimeError as err:
        raise FileFormatError(f"checkpoint: guide.safetensors does not fit ({err})") from None
    tensors = _load_tensors(path / "optimizer.safetensors")
    opt_state: dict = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        opt_state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})


# -- the loop -------------------------------------------------------------------------------
def _next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def _step_sizes(config: FitConfig, generator: torch.Generator) -> list[float]:
    draws = torch.rand(config.n_random_sizes, generator=generator, dtype=torch.float64)
    between = config.size_min + (config.size_max - config.size_min) * draws
    return [config.size_min, *between.tolist()]


def fit(
    lm: nn.Module,
    tokens: torch.Tensor | TokenBlocks,
    config: FitConfig = FitConfig(),
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    tokenizer=None,
    progress: bool = True,
) -> PuppetFit:
    """Fit the gate posterior and the LM's weights together.

    ``tokens`` is a 1-D token tensor (cut into random windows of ``config.seq_len``) or
    :class:`~ppn_bayes.data.TokenBlocks`. With ``checkpoint``, the state is written there
    every ``config.checkpoint_every`` steps and at the end; with ``resume=True`` a fit
    continues from the checkpoint found there. Returns a :class:`PuppetFit`.
    """
    blocks = tokens if isinstance(tokens, TokenBlocks) else TokenBlocks(tokens, config.seq_len, config.seed)
    if blocks.seq_len != config.seq_len:
        raise ValueError(f"token blocks of {blocks.seq_len} tokens, but config.seq_len={config.seq_len}")
    arch = describe(lm, mlp_group=config.mlp_group)
    gated, model, guide = _build(lm, config, arch, prior_tokens=blocks.tokens.numel())
    if not config.train_lm:
        lm.requires_grad_(False)
    optimizer = _optimizer(lm, guide, config)
    elbo = pyro.infer.Trace_ELBO()(model, guide)
    device = next(lm.parameters()).device

    history: list[dict] = []
    start = 0
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if checkpoint is None or not (checkpoint / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {checkpoint}")
        state = read_state(checkpoint)
        if state["architecture"] != arch.to_dict():
            raise FileFormatError(f"checkpoint {checkpoint} is from another model (its architecture differs)")
        saved = FitConfig.from_dict(state["config"])
        ignore = ("steps", "checkpoint_every", "log_every")
        if saved.replace(**{k: getattr(config, k) for k in ignore}) != config:
            raise ValueError(f"checkpoint {checkpoint} was fitted with other settings: {saved}")
        _restore(checkpoint, state, lm, guide, optimizer)
        start, history = state["step"], state["history"]

    tokens_per_step = config.batch_size * config.seq_len
    lm.train()
    began = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
               desc="fit", unit="step")
    for step in bar:
        torch.manual_seed(config.seed * 7919 + step)
        generator = torch.Generator().manual_seed(config.seed * 104_729 + step)
        input_ids = blocks.batch(step, config.batch_size).to(device)  # [B, T]
        sizes = _step_sizes(config, generator)
        optimizer.zero_grad(set_to_none=True)
        # Full size: the LM's own loss, and the teacher for self-distillation.
        with torch.set_grad_enabled(config.train_lm):
            teacher_logits = gated(input_ids)  # [B, T, V]
            nll_full = _next_token_loss(teacher_logits, input_ids)
        if config.train_lm:
            nll_full.backward()
        teacher_logits = teacher_logits.detach()
        # Smallest and random sizes: the ELBO per token, averaged over sizes.
        elbo_total = 0.0
        for size in sizes:
            loss = elbo(input_ids, size, teacher_logits) / len(sizes)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss.item()} at step {step} (size {size:.3f}); "
                    "lower lr_lm / lr_guide or check the data"
                )
            loss.backward()
            elbo_total += loss.item()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           config.grad_clip)
        optimizer.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            row = {"step": step, "loss": elbo_total, "nll_full": nll_full.item()}
            history.append(row)
            bar.set_postfix(loss=f"{elbo_total:.3f}", nll_full=f"{row['nll_full']:.3f}")
        done = step + 1
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < config.steps:
            save_checkpoint(checkpoint, lm=lm, guide=guide, optimizer=optimizer, step=done, config=config,
                            arch=arch, history=history, tokenizer=tokenizer)
    bar.close()
    lm.eval()
    gated.unload()
    seconds = time.perf_counter() - began
    steps_run = config.steps - start
    if checkpoint is not None:
        save_checkpoint(checkpoint, lm=lm, guide=guide, optimizer=optimizer, step=config.steps, config=config,
                        arch=arch, history=history, tokenizer=tokenizer)
    result = FitResult(
        config=config.to_dict(),
        architecture=arch.to_dict(),
        history=history,
        steps_done=config.steps,
        train_tokens=config.steps * tokens_per_step,
        seconds=seconds,
        tokens_per_s=steps_run * tokens_per_step / seconds if seconds > 0 else 0.0,
        device=str(device),
        checkpoint=str(checkpoint) if checkpoint is not None else None,
    )
    if not config.train_lm:
        lm.requires_grad_(True)
    return PuppetFit(lm=lm, guide=guide, config=config, result=result)


def load_fit(path: str | Path, *, device: str | torch.device = "cpu", dtype=torch.float32) -> PuppetFit:
    """A :class:`PuppetFit` from a checkpoint directory written by :func:`fit`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    state = read_state(path)
    config = FitConfig.from_dict(state["config"])
    if not (path / "lm" / "config.json").is_file():
        raise FileFormatError(f"checkpoint {path}: lm/config.json is missing")
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path / "lm"), dtype=dtype).to(device).eval()
    except (OSError, ValueError, SafetensorError) as err:
        raise FileFormatError(f"checkpoint {path}: the LM does not load ({err})") from None
    arch = describe(lm, mlp_group=config.mlp_group)
    if arch.to_dict() != state["architecture"]:
        raise FileFormatError(f"checkpoint {path}: the LM does not match the recorded architecture")
    guide = _guide(config, arch, prior_scale=1.0)
    try:
        guide.load_state_dict(_load_tensors(path / "guide.safetensors"))
    except RuntimeError as err:
        raise FileFormatError(f"checkpoint {path}: guide.safetensors does not fit ({err})") from None
    guide.to(device)
    result = FitResult(config=state["config"], architecture=state["architecture"], history=state["history"],
                       steps_done=state["step"], checkpoint=str(path), versions=state.get("versions", {}))
    return PuppetFit(lm=lm, guide=guide, config=config, result=result)
