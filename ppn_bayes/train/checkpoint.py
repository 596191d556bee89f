"""A fit's checkpoint: a folder written atomically, safetensors for tensors, JSON for the rest.

Layout: ``lm/`` (a Hugging Face directory, one ``model.safetensors``), ``guide.safetensors``,
``optimizer.safetensors``, ``state.json``, for a fit with size adapters (``size_rank > 0``)
``adapters.safetensors`` and, for a fit stopped while it averages its guide,
``guide_sum.safetensors``. :func:`check_resumable` is the resume
contract: a checkpoint continues only with the same model, the same settings, the same
global batch, the same training data and more steps than it has done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
from pathlib import Path

import pyro
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..version import VERSION as __version__
from ..core.architecture import Architecture
from ..core.config import NOT_IDENTIFYING, FitConfig
from ..io import FileFormatError, atomic_directory, atomic_write_text, read_json
from ..core.model import PuppetGuide
from ..optim_state import load_tensors, optimizer_tensors, read_optimizer, restore_optimizer
from ..store import check_same_data

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint", "read_state", "read_optimizer",
           "read_guide_sum", "restore_adapters", "restore_modules", "restore_optimizer", "recorded_architecture",
           "recorded_size_rank", "load_tensors", "check_resumable", "weights_fingerprint", "versions"]

CHECKPOINT_FORMAT = "ppn_bayes.checkpoint"
CHECKPOINT_VERSION = 1

#: Settings that may change between a checkpoint and its resume: those that do not identify a
#: fit (``identifies=False`` in their metadata, :data:`~ppn_bayes.core.config.NOT_IDENTIFYING`),
#: and three that do but have their own rules in :func:`check_resumable`: ``steps`` may grow
#: (not under ``lr_schedule='cosine'``, whose curve it sets), and ``batch_size`` and
#: ``accumulate`` may trade with the number of processes while the global batch stays.
RESUMABLE_SETTINGS = NOT_IDENTIFYING + ("steps", "batch_size", "accumulate")


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
                    lm_class: type | None = None, teacher_fingerprint: str | None = None,
                    data: dict | None = None, guide_sum: dict | None = None, adapters: nn.Module | None = None) -> Path:
    """Write a fit's checkpoint directory atomically.

    Layout: ``lm/`` (a Hugging Face directory, one ``model.safetensors``),
    ``guide.safetensors``, ``optimizer.safetensors`` and ``state.json`` (format, version,
    step, settings, architecture, loss history, held-out NLL, optimizer groups, and the number of
    processes ``world_size`` whose batches of ``config.batch_size`` made a step, the identity of
    the training ``data`` (:func:`check_resumable` compares it); with
    ``FitConfig.teacher='original'``, the ``teacher_fingerprint`` of the LM the fit started
    from, which a resumed fit checks its LM against).

    The ``*_state_dict`` / ``optimizer_state`` arguments replace the modules' own states
    with full tensors gathered from a sharded fit (see
    :func:`ppn_bayes.distributed.full_state_dict`); ``lm_class`` is then the LM's class
    before sharding. Every tensor is written whole, so the checkpoint loads in any
    number of processes. ``guide_sum`` (a fit stopped while it averages its guide,
    ``FitConfig.average_steps``): the guide's parameters summed so far, in
    ``guide_sum.safetensors``. ``adapters`` (``FitConfig.size_rank > 0``): the size adapters'
    tensors (``layers.<l>.o_A`` …), in ``adapters.safetensors``.
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
    if data is not None:
        state["data"] = data
    with atomic_directory(path, overwrite=overwrite) as tmp:
        if lm_state_dict is None:
            lm.save_pretrained(tmp / "lm", max_shard_size="100000GB")
        else:
            _write_lm(tmp / "lm", lm, lm_state_dict, lm_class or type(lm))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "lm")
        save_file({k: v.detach().cpu().contiguous() for k, v in guide_tensors.items()}, tmp / "guide.safetensors")
        save_file(optimizer_tensors(opt), tmp / "optimizer.safetensors")
        if guide_sum is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in guide_sum.items()}, tmp / "guide_sum.safetensors")
        if adapters is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()},
                      tmp / "adapters.safetensors")
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


def recorded_size_rank(path) -> int:
    """The ``size_rank`` of the fit checkpoint at ``path`` (0, no size adapters, for fits
    older than them)."""
    return int(read_state(path)["config"].get("size_rank", 0))


def recorded_architecture(state: dict, path) -> Architecture:
    """The architecture a checkpoint records (JSON turned its tuples into lists)."""
    try:
        return Architecture.from_dict(state["architecture"])
    except (ValueError, TypeError, KeyError) as err:
        raise FileFormatError(f"checkpoint {path}: state.json has a malformed architecture ({err})") from None


def _read_adapters(path: Path, adapters: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``adapters.safetensors``, refused when the file is missing or its names
    are not those of ``adapters``."""
    file = Path(path) / "adapters.safetensors"
    if not file.is_file():
        raise FileFormatError(f"checkpoint: {file} is missing: the fit has size adapters (size_rank > 0)")
    tensors = load_tensors(file)
    if set(tensors) != set(adapters.state_dict()):
        raise FileFormatError(f"checkpoint: {file} does not fit these size adapters")
    return tensors


def restore_adapters(path: Path, adapters: nn.Module, tensors: dict | None = None) -> None:
    """Load the size adapters' tensors from ``adapters.safetensors`` (or ``tensors`` read
    from it already), checked by name and shape."""
    tensors = tensors if tensors is not None else _read_adapters(path, adapters)
    try:
        adapters.load_state_dict(tensors)
    except RuntimeError as err:
        raise FileFormatError(f"checkpoint: {Path(path) / 'adapters.safetensors'} does not fit ({err})") from None


def restore_modules(path: Path, lm: nn.Module, guide: PuppetGuide, adapters: nn.Module | None = None) -> None:
    """Load the LM's, the guide's and the size adapters' (when given) tensors; every file is
    read and checked first."""
    from safetensors.torch import load_model

    guide_tensors = load_tensors(path / "guide.safetensors")
    adapter_tensors = _read_adapters(path, adapters) if adapters is not None else None
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
    if adapters is not None:
        restore_adapters(path, adapters, adapter_tensors)


def read_guide_sum(path: Path, guide: PuppetGuide) -> dict[str, torch.Tensor]:
    """The guide's parameters summed over the averaged steps so far (``guide_sum.safetensors``,
    written by a fit stopped while it averages), on the guide's devices; checked against the
    guide's parameters by name and shape."""
    file = Path(path) / "guide_sum.safetensors"
    if not file.is_file():
        raise FileFormatError(f"checkpoint: {file} is missing: the fit stopped while averaging its guide "
                              f"(average_steps) and needs the sum so far to resume")
    tensors = load_tensors(file)
    params = dict(guide.named_parameters())
    if set(tensors) != set(params) or any(tensors[k].shape != p.shape for k, p in params.items()):
        raise FileFormatError(f"checkpoint: {file} does not fit this guide's parameters")
    return {k: tensors[k].to(device=p.device, dtype=p.dtype) for k, p in params.items()}


def check_resumable(state: dict, checkpoint: Path, config: FitConfig, arch: Architecture, world_size: int,
                    data: dict | None = None):
    """Refuse a checkpoint of another model, other settings, another global batch, other
    training data (``data``: the identity of what this fit reads, compared with the one the
    checkpoint recorded) or at least as many steps as this fit asks for."""
    if recorded_architecture(state, checkpoint) != arch:
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
    if saved.replace(**{k: getattr(config, k) for k in RESUMABLE_SETTINGS}) != config:
        changed = {k: (getattr(saved, k), getattr(config, k)) for k in saved.to_dict()
                   if k not in RESUMABLE_SETTINGS and getattr(saved, k) != getattr(config, k)}
        raise ValueError(f"checkpoint {checkpoint} was fitted with other settings: "
                         + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in changed.items()))
    if config.lr_schedule == "cosine" and config.steps != saved.steps:
        raise ValueError(f"checkpoint {checkpoint} was fitted under a cosine schedule over {saved.steps} steps; "
                         f"steps={config.steps} would bend it: resume with steps={saved.steps}")
    if config.steps < state["step"]:
        raise ValueError(f"checkpoint {checkpoint} has done {state['step']} steps; a resume cannot go back to "
                         f"steps={config.steps} (ask for {state['step']} steps or more)")
    saved_data = state.get("data")
    if data is not None and saved_data is not None:
        try:
            check_same_data(saved_data, data)
        except ValueError as err:
            raise ValueError(f"checkpoint {checkpoint}: {err}") from None


def weights_fingerprint(lm: nn.Module) -> str:
    """SHA-256 of the LM's named tensors (names, dtypes, shapes and bytes): which LM a
    fit with ``teacher='original'`` started from."""
    digest = hashlib.sha256()
    for name, tensor in lm.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


