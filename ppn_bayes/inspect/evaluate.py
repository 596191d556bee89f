"""Perplexity: exp(mean next-token NLL over non-overlapping windows).

The protocol of docs/benchmarks.md: the whole text tokenised at once, no special tokens
added, cut into windows of ``seq_len`` tokens, the remainder dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import TokenBlocks
from ..core.gating import GatedLM, Gates

__all__ = ["Perplexity", "perplexity"]


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    lm: nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    gates: Gates | None = None,
    masks=None,
    arch=None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of ``lm`` on ``tokens [N]``; under ``gates`` or hard ``masks`` if given
    (the masked-dense reference), else the LM as it is (a full LM or a sub-network).
    ``arch`` is the :class:`~ppn_bayes.core.architecture.Architecture` the gates refer to
    (masks carry their own)."""
    windows = TokenBlocks(tokens, seq_len).windows(limit)  # [W, T]
    if masks is not None:
        gates, arch = masks.gates(), masks.arch
    device = next(lm.parameters()).device
    gated = GatedLM(lm, arch) if gates is not None else None
    if gates is not None:
        gates = Gates(gates.layer.to(device), gates.unit.to(device))
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    from tqdm.auto import tqdm

    try:
        for start in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="perplexity"):
            batch = windows[start:start + batch_size].to(device)  # [b, T]
            if gated is not None:
                logits = gated(batch, gates=gates)
            else:
                logits = lm(input_ids=batch, use_cache=False).logits  # only the logits: no KV cache
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    finally:
        if gated is not None:
            gated.unload()
        lm.train(was_training)
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, windows=len(windows), seq_len=seq_len)
