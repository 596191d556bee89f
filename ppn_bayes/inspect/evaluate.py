"""Perplexity: exp(mean next-token NLL over non-overlapping windows).

The protocol of docs/benchmarks.md: the whole text tokenised at once, no special tokens
added, cut into windows of ``seq_len`` tokens, the remainder dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import TokenBlocks
from ..core.gating import GatedLM, Gates

__all__ = ["Perplexity", "context_buckets", "perplexity"]


def context_buckets(columns: int) -> list[tuple[int, int]]:
    """Doubling buckets ``(first, last)`` of context lengths, ``[1, 1], [2, 3], [4, 7], ...``,
    the last cut at ``columns`` (a window of ``columns + 1`` tokens predicts from 1 to
    ``columns`` tokens)."""
    out, lo = [], 1
    while lo <= columns:
        hi = min(2 * lo - 1, columns)
        out.append((lo, hi))
        lo = hi + 1
    return out


@dataclass(frozen=True)
class Perplexity:
    """The perplexity, the mean NLL, the windows and their length; with ``per_token=True``
    also every predicted token's NLL, ``token_nll [W, seq_len - 1]`` (float32, on the CPU):
    entry ``[w, j]`` is the loss of token ``j + 1`` of window ``w`` from the ``j + 1`` tokens
    before it."""

    ppl: float
    nll: float
    windows: int
    seq_len: int
    token_nll: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "windows": self.windows, "seq_len": self.seq_len}

    def nll_by_context(self) -> list[dict]:
        """The mean NLL of the tokens predicted from ``c`` tokens of context, in buckets
        ``c`` in [1, 2), [2, 4), [4, 8), ... up to the window's length: where a network
        loses (or keeps) the use of long context. Needs ``per_token=True``."""
        if self.token_nll is None:
            raise ValueError("nll_by_context needs the per-token losses: perplexity(..., per_token=True)")
        out = []
        for first, last in context_buckets(self.token_nll.shape[1]):  # column j: context j + 1
            chunk = self.token_nll[:, first - 1:last].double()
            out.append({"context_from": first, "context_to": last, "tokens": chunk.numel(), "nll": float(chunk.mean())})
        return out


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
    per_token: bool = False,
) -> Perplexity:
    """Perplexity of ``lm`` on ``tokens [N]``; under ``gates`` or hard ``masks`` if given
    (the masked-dense reference), else the LM as it is (a full LM or a sub-network).
    ``arch`` is the :class:`~ppn_bayes.core.architecture.Architecture` the gates refer to
    (masks carry their own). ``per_token`` keeps every token's NLL (:class:`Perplexity`)."""
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
    kept = []
    from tqdm.auto import tqdm

    try:
        for start in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="perplexity"):
            batch = windows[start:start + batch_size].to(device)  # [b, T]
            if gated is not None:
                logits = gated(batch, gates=gates)
            else:
                logits = lm(input_ids=batch, use_cache=False).logits  # only the logits: no KV cache
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                  reduction="none" if per_token else "sum")
            if per_token:
                kept.append(nll.view(batch.shape[0], -1).cpu())
            total += nll.sum().item()
            count += batch[:, 1:].numel()
    finally:
        if gated is not None:
            gated.unload()
        lm.train(was_training)
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, windows=len(windows), seq_len=seq_len,
                      token_nll=torch.cat(kept) if per_token else None)
