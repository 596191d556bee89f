"""An optimizer's state as safetensors: one tensor per ``state.<index>.<key>``, the groups in JSON.

Shared by the fit's checkpoints (:mod:`ppn_bayes.train.checkpoint`) and the fine-tune's
(:mod:`ppn_bayes.deploy.finetune`); it imports neither pyro nor arviz.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import distributed
from .io import FileFormatError

__all__ = ["optimizer_tensors", "read_optimizer", "restore_optimizer", "load_tensors"]


def optimizer_tensors(opt_state: dict) -> dict:
    """``Optimizer.state_dict()['state']`` as flat, contiguous CPU tensors for safetensors."""
    return {
        f"state.{index}.{key}": value.detach().cpu().contiguous()
        for index, state in opt_state["state"].items()
        for key, value in state.items()
    }


def load_tensors(file: Path) -> dict:
    """The tensors of a safetensors file, or a :class:`FileFormatError` naming it."""
    if not file.is_file():
        raise FileFormatError(f"checkpoint: {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"checkpoint: {file} is corrupt ({err})") from None


def read_optimizer(path: Path, state: dict) -> dict:
    """The optimizer state in ``path/optimizer.safetensors``, index-keyed as
    ``Optimizer.state_dict`` has it, with the groups that ``state['optimizer_groups']`` records."""
    opt_state: dict = {}
    for name, value in load_tensors(path / "optimizer.safetensors").items():
        try:
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value
        except ValueError:
            raise FileFormatError(f"checkpoint {path}: optimizer.safetensors holds an unknown entry {name!r}") from None
    return {"state": opt_state, "param_groups": state["optimizer_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, opt_state: dict, path: Path) -> None:
    """Load ``opt_state`` (full tensors; cut to this process's shards under FSDP) into ``optimizer``."""
    try:
        optimizer.load_state_dict(distributed.shard_optimizer_state(optimizer, opt_state))
    except (ValueError, KeyError, IndexError, RuntimeError) as err:
        raise FileFormatError(f"checkpoint {path}: optimizer.safetensors does not fit ({err})") from None
