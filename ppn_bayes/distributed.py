"""Several processes: torchrun, DistributedDataParallel and FSDP2, nothing home-made.

:func:`~ppn_bayes.fit.fit` calls :func:`setup` first. Launched by ``torchrun`` (the
environment holds ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) it joins the process group
(NCCL and ``cuda:LOCAL_RANK`` when CUDA is present, gloo and the CPU otherwise); as a
single process it changes nothing. :func:`wrap` then hands the step module to PyTorch's
own engine:

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`. Every process holds the
  whole LM and the guide; gradients are averaged across processes in the backward pass.
* ``fsdp``: FSDP2's ``fully_shard`` on every decoder layer and on the root (the step
  module: embeddings, final norm, LM head and the guide's few hundred parameters). Every
  process holds a shard of each tensor; layers are gathered for their forward and
  backward passes, gradients reduce-scattered.

Checkpoints hold plain, full tensors: :func:`full_state_dict` and
:func:`full_optimizer_state` gather sharded tensors (every process takes part, one tensor
at a time) and :func:`shard_optimizer_state` cuts full tensors back to this process's
shards. A checkpoint therefore loads in any number of processes, or in one.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PARALLEL", "Context", "launched", "setup", "wrap", "full_state_dict", "full_optimizer_state",
           "shard_optimizer_state", "is_main_process"]

#: Values of ``FitConfig.parallel``.
PARALLEL = ("auto", "none", "ddp", "fsdp")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0 of an initialised process group or of a torchrun launch; else ``True``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return DTensor


@dataclass
class Context:
    """Where this process stands: its rank, the world, its device and the parallel mode.

    ``parallel`` is the resolved mode (``none``, ``ddp`` or ``fsdp``).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    parallel: str = "none"

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (nothing in a single process)."""
        if self.distributed:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over processes (a sum and a division: gloo has no AVG)."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    def no_sync(self, module: nn.Module):
        """Skip the gradient all-reduce of DDP for a backward pass that accumulates.

        FSDP keeps reduce-scattering every backward (sharded gradients accumulate, so
        memory stays at one shard); a single process has nothing to skip.
        """
        if self.parallel == "ddp":
            return module.no_sync()
        return contextlib.nullcontext()


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(parallel: str, device: torch.device | str) -> Context:
    """Join the process group when launched by torchrun, and resolve ``parallel``.

    ``parallel``: ``auto`` (DDP when there are several processes, else none), ``none``,
    ``ddp`` or ``fsdp``. ``device`` is where a single process runs (the LM's device);
    several processes use ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    A process group initialised by the caller is used as it is; one that :func:`setup`
    creates stays for later fits of the same process (re-creating a group on the same
    torchrun store is not reliable) and is destroyed when the process exits.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    grouped = dist.is_available() and dist.is_initialized()
    if not grouped and not launched():
        if parallel in ("ddp", "fsdp"):
            raise ValueError(
                f"parallel={parallel!r} needs several processes: launch with "
                "`torchrun --nproc-per-node N ...` (or initialise a process group first)"
            )
        return Context(device=torch.device(device))
    world_size = dist.get_world_size() if grouped else int(os.environ["WORLD_SIZE"])
    if parallel == "auto":
        parallel = "ddp" if world_size > 1 else "none"
    if parallel == "none":
        if world_size > 1:
            raise ValueError(
                f"parallel='none' with {world_size} processes would fit {world_size} independent "
                "copies; use parallel='auto', 'ddp' or 'fsdp'"
            )
        return Context(device=torch.device(device))
    rank = dist.get_rank() if grouped else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    here = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(here)
    if not grouped:
        if cuda:
            dist.init_process_group("nccl", device_id=here)
        else:
            dist.init_process_group("gloo")
        atexit.register(_destroy_group)
    return Context(rank=rank, local_rank=local_rank, world_size=world_size, device=here, parallel=parallel)


def wrap(module: nn.Module, layers: nn.ModuleList, context: Context, *,
         find_unused_parameters: bool = False) -> nn.Module:
    """``module`` under DDP or FSDP2 as ``context.parallel`` says (unchanged for ``none``).

    For FSDP, every entry of ``layers`` (the decoder layers) is sharded on its own and
    ``module`` is the root. ``module`` must already sit on ``context.device`` for DDP;
    FSDP moves each shard there itself, so the LM may still be on the CPU.
    ``find_unused_parameters`` (DDP): set it when some trainable parameter gets no
    gradient in the last backward pass of a step.
    """
    if context.parallel == "none":
        return module
    if context.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        # Buffers (unit costs, rotary tables) are equal everywhere: no broadcast per forward.
        # torch 2.13 renamed broadcast_buffers to forward_sync_buffers.
        names = inspect.signature(DistributedDataParallel).parameters
        buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                       **buffers)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(context.device.type, (context.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _full(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    DTensor = _dtensor_type()
    if DTensor and isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()  # an all-gather: every process takes part
    return tensor.detach().cpu() if keep else None


def full_state_dict(module: nn.Module, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """Plain, full CPU tensors of ``module.state_dict()``.

    Sharded tensors are gathered one at a time (peak device memory: one full tensor);
    every process must call this, in the same order. With ``keep=False`` a process only
    takes part in the gathering and gets an empty dict (rank 0 alone needs the tensors it
    writes). Names that share one tensor (tied embeddings) share one CPU tensor as well,
    so ``save_pretrained`` treats them as tied, as it would the unsharded LM.
    """
    seen: dict[int, torch.Tensor | None] = {}
    state = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key not in seen:
            seen[key] = _full(tensor, keep)
        state[name] = seen[key]
    return state if keep else {}


def full_optimizer_state(optimizer: torch.optim.Optimizer, *, keep: bool = True) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered to a full CPU one
    (``keep=False``: take part in the gathering only, and get an empty dict)."""
    state = optimizer.state_dict()
    full = {
        "state": {index: {key: _full(value, keep) if torch.is_tensor(value) else value
                          for key, value in entry.items()}
                  for index, entry in state["state"].items()},
        "param_groups": state["param_groups"],
    }
    return full if keep else {}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full optimizer state (index-keyed, as :func:`full_optimizer_state` returns) cut to
    the shards of this process: state tensors of a sharded parameter become DTensors laid
    out like the parameter; everything else is returned as it is."""
    DTensor = _dtensor_type()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not DTensor or not any(isinstance(p, DTensor) for p in params):
        return state
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            entry = {
                key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                if torch.is_tensor(value) and value.shape == param.shape else value
                for key, value in entry.items()
            }
        out[index] = entry
    return {"state": out, "param_groups": state["param_groups"]}
