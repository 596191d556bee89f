"""Text the LM writes itself: training text beyond a small corpus.

A fit that sees a small corpus many times moves the LM towards that corpus: on
SmolLM2-135M, 500 steps over the 1.1M-token wiki summaries came out worse on WikiText at
every size than 160 steps (docs/benchmarks.md, "a longer fit"). Text the full LM generates
is as plentiful as one asks and is, by construction, text the full LM finds likely, so
training on it (and distilling on it) pulls the sub-networks towards the full LM rather
than towards the corpus.

:func:`teacher_tokens` continues prompts drawn from a corpus (``prompt_len`` tokens at
random offsets) by ``new_tokens`` tokens each, with tempered top-k sampling: pure
temperature-1 sampling from a small LM drifts into noise within a few hundred tokens
(BENCHMARKS.md). Each sequence is its prompt followed by its continuation; the sequences
are concatenated into one token stream that :func:`ppn_bayes.fit` reads like any other
(``ppn-bayes teacher-text`` writes it as a ``tokens`` safetensors file for ``ppn-bayes fit
--data``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .generation import Decoder

__all__ = ["teacher_tokens"]


def _check(corpus: torch.Tensor, n_tokens: int, prompt_len: int, new_tokens: int, batch_size: int,
           temperature: float, top_k: int | None) -> None:
    if corpus.dim() != 1:
        raise ValueError(f"the corpus must be a 1-D token tensor, got shape {tuple(corpus.shape)}")
    for name, value in (("n_tokens", n_tokens), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if corpus.numel() < prompt_len:
        raise ValueError(f"the corpus has {corpus.numel()} tokens, fewer than one prompt of {prompt_len}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive (sampling), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")


@torch.no_grad()
def teacher_tokens(
    lm: nn.Module,
    corpus: torch.Tensor,
    *,
    n_tokens: int,
    prompt_len: int = 32,
    new_tokens: int = 224,
    batch_size: int = 32,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """At least ``n_tokens`` tokens ``[M]``: corpus prompts and the LM's continuations.

    Rounds of ``batch_size`` sequences of ``prompt_len + new_tokens`` tokens are generated
    until ``n_tokens`` are reached (``M`` is a whole number of sequences). The prompts are
    windows of ``corpus [N]`` at offsets drawn with ``seed``; the continuations are sampled
    at ``temperature`` from the ``top_k`` most likely tokens (``top_k=None``: all) with a
    generator on the decoding device seeded with ``seed``, so a run repeats exactly on the
    same machine. ``device``, ``dtype`` and ``compile`` go to
    :class:`~ppn_bayes.generation.Decoder` (static KV cache; on a GPU ``compile=True``
    captures the decode step as a CUDA graph).
    """
    corpus = torch.as_tensor(corpus)
    _check(corpus, n_tokens, prompt_len, new_tokens, batch_size, temperature, top_k)
    per_sequence = prompt_len + new_tokens
    rounds = math.ceil(n_tokens / (per_sequence * batch_size))
    was_training = lm.training
    lm.eval()
    decoder = Decoder(lm, max_len=per_sequence, batch_size=batch_size, device=device, dtype=dtype,
                      compile=compile)
    # Not TokenBlocks.batch: its windows are training windows (two tokens at least); a prompt
    # may be a single token.
    offsets = torch.Generator().manual_seed(seed)
    sampler = torch.Generator(device=decoder.device).manual_seed(seed)
    window = torch.arange(prompt_len)
    sequences = []
    from tqdm.auto import tqdm

    try:
        for _ in tqdm(range(rounds), disable=not progress, desc="teacher text", unit="batch"):
            starts = torch.randint(0, corpus.numel() - prompt_len + 1, (batch_size,), generator=offsets)
            prompts = corpus[starts[:, None] + window]  # [B, P]
            new = decoder.generate(prompts.to(decoder.device), new_tokens, temperature=temperature,
                                   generator=sampler, top_k=top_k)  # [B, N]
            sequences.append(torch.cat([prompts, new.cpu()], dim=1))  # [B, P + N]
    finally:
        lm.train(was_training)
    return torch.cat(sequences).flatten()  # [rounds * B * (P + N)]
