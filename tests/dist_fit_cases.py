"""The tiny fits that tests/test_distributed.py runs in one process and under torchrun.

``config.batch_size`` is the global batch: a run of ``N`` processes gives each ``1/N``.
"""

from __future__ import annotations

import torch

from ppn_bayes.core.config import FitConfig
from ppn_bayes.lm import tiny_llama

_BASE = FitConfig(steps=4, batch_size=4, seq_len=16, mlp_group=32, log_every=1, n_random_sizes=1,
                  lr_lm=1e-3, checkpoint_every=2)

CASES = {
    # With held-out text: every process evaluates the same windows.
    "ddp": {"config": _BASE.replace(parallel="ddp", eval_every=2, eval_windows=2), "tied": True, "eval": True},
    # Stopped at step 2 and resumed: the sharded optimizer state goes through a checkpoint.
    "fsdp-resume": {"config": _BASE.replace(parallel="fsdp"), "tied": True},
    # Ablations leave guide parameters without gradient: DDP's find_unused_parameters; and
    # the frozen original LM as the teacher, a copy in every process.
    "ddp-flat-point": {"config": _BASE.replace(parallel="ddp", hierarchy=False, posterior="point",
                                               teacher="original"), "tied": False},
    # The first 2 steps hold and the last 2 settle: the whole guide without gradient
    # (find_unused_parameters), the LM trained on the deployed masks, read from the guide
    # that every process holds: its start, then the mean of its 2 steps before the settling
    # (average_steps), in every process alike.
    "ddp-settle": {"config": _BASE.replace(parallel="ddp", gate_coupling="prefix", init_jitter=0.5, steps=6,
                                           hold_steps=2, settle_steps=2, average_steps=2),
                   "tied": True},
    # Size adapters: their parameters live in the wrapped module and train in the LM's group;
    # the held-out evaluations read the merged LM of each size.
    "ddp-adapters": {"config": _BASE.replace(parallel="ddp", size_rank=2, eval_every=2, eval_windows=2),
                     "tied": True, "eval": True},
}


def case_lm(name: str):
    """The tiny Llama of case ``name`` (tied embeddings or not), the same in every process."""
    if CASES[name]["tied"]:
        return tiny_llama(97, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, seed=0,
                          attn_implementation="eager")
    from conftest import tiny_lm

    return tiny_lm("llama")


def case_eval_tokens(name: str) -> torch.Tensor | None:
    """Held-out tokens for the cases that evaluate during the fit, else ``None``."""
    if not CASES[name].get("eval"):
        return None
    return torch.randint(0, 97, (80,), generator=torch.Generator().manual_seed(4))


def case_tokens() -> torch.Tensor:
    """A fixed stream of 600 tokens."""
    return torch.randint(0, 97, (600,), generator=torch.Generator().manual_seed(3))
