"""The backend of ``ppn-bayes eval``: the perplexity of any model file on a text file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..deploy.artifacts import open_model
from ..data import load_tokens
from .evaluate import perplexity
from ..deploy.subnetwork import decoder_params

__all__ = ["evaluate_model"]


def evaluate_model(path: str | Path, data: str | Path, *, seq_len: int = 2048, limit: int | None = None,
                   batch_size: int = 8, size: float | None = None, n_params: int | None = None,
                   masks_file: str | Path | None = None, masked_dense: bool = False,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   progress: bool = False) -> dict:
    """Perplexity of a model (any kind :func:`open_model` opens) on a text file.

    The protocol of the benchmarks: the whole file tokenised at once with the model's
    tokenizer, cut into non-overlapping windows of ``seq_len`` tokens (the remainder
    dropped), at most ``limit`` windows. Returns a JSON-ready record.
    """
    opened = open_model(path, size=size, n_params=n_params, masks_file=masks_file, masked_dense=masked_dense,
                        device=device, dtype=dtype)
    if opened.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer to read {data} with")
    tokens = load_tokens(data, opened.tokenizer)
    result = perplexity(opened.lm, tokens, seq_len=seq_len, limit=limit, batch_size=batch_size,
                        masks=opened.masks if opened.masked_dense else None, progress=progress)
    record = {"model": str(path), "kind": opened.kind, "data": str(data), **result.to_dict(), "limit": limit,
              "tokens": int(tokens.numel()), "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    if opened.masks is not None:
        record.update(size_requested=opened.masks.size_requested, size_reached=opened.masks.size_reached,
                      kept_params=opened.masks.kept_params, total_params=opened.masks.total_params,
                      evaluated="masked-dense" if opened.masked_dense else "sub-network")
    record["decoder_params"] = decoder_params(opened.lm) if not opened.masked_dense else None
    return record
