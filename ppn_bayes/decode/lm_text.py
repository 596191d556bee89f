"""Text the LM writes itself: training text beyond a small corpus.

A fit that sees a small corpus many times moves the LM towards that corpus: on
SmolLM2-135M, 500 steps over the 1.1M-token wiki summaries came out worse on WikiText at
every size than 160 steps (docs/benchmarks.md, "a longer fit"). Text the full LM generates
is as plentiful as one asks and is, by construction, text the full LM finds likely, so
training on it (and distilling on it) pulls the sub-networks towards the full LM rather
than towards the corpus.

Both writers continue prompts drawn from a corpus (``prompt_len`` tokens at random
offsets) by ``new_tokens`` tokens each, with tempered top-k (and optionally top-p)
sampling: pure temperature-1 sampling from a small LM drifts into noise within a few
hundred tokens (BENCHMARKS.md). Each sequence is its prompt followed by its continuation.

* :func:`write_teacher_store` writes a :mod:`token store <ppn_bayes.store>` round by
  round, resumable: round ``r``'s prompts and sampling seed are a pure function of
  ``(seed, r)``, so a resumed run writes what an uninterrupted one writes. This is what
  ``ppn-bayes teacher-text --out FOLDER`` runs.
* :func:`teacher_tokens` returns one tensor (one generator for all rounds, as before the
  store existed); ``ppn-bayes teacher-text --out FILE.safetensors`` writes it as a token
  file.

A cheap guard drops degenerate samples: a continuation whose fraction of distinct 4-grams
is below ``min_distinct`` (a loop repeating a phrase has few) is not kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path

import torch
from torch import nn

from ..data import check_token_ids
from .generation import Decoder, check_sampling, distinct_ngram_fraction
from ..lm import vocab_rows
from ..store import DEFAULT_SHARD_TOKENS, TokenStore, TokenStoreWriter, tokenizer_identity

__all__ = ["check_generation_settings", "teacher_tokens", "write_teacher_store"]

# Give up when fewer than this fraction of the sequences are kept after at least
# _GIVE_UP_AFTER rounds: min_distinct is then too strict for this LM and these settings.
_GIVE_UP_KEPT = 0.05
_GIVE_UP_AFTER = 8


def check_generation_settings(*, n_tokens: int, prompt_len: int, new_tokens: int, batch_size: int,
                              temperature: float, top_k: int | None, top_p: float | None = None,
                              min_distinct: float = 0.0, shard_tokens: int = 1) -> None:
    """Raise ``ValueError`` naming the first setting out of range (before any work)."""
    for name, value in (("n_tokens", n_tokens), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("batch_size", batch_size), ("shard_tokens", shard_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite (sampling), got {temperature}")
    check_sampling(temperature, top_k, top_p)
    if not 0 <= min_distinct <= 1:
        raise ValueError(f"min_distinct must be in [0, 1] (a fraction of distinct 4-grams), got {min_distinct}")
    if min_distinct > 0 and new_tokens < 4:
        raise ValueError(f"min_distinct judges a continuation's 4-grams: new_tokens={new_tokens} has none; "
                         "give new_tokens >= 4 or min_distinct=0")


def _check(lm: nn.Module, corpus: torch.Tensor, settings: dict) -> None:
    check_generation_settings(**settings)
    if corpus.dim() != 1:
        raise ValueError(f"the corpus must be a 1-D token tensor, got shape {tuple(corpus.shape)}")
    if corpus.is_floating_point():
        raise ValueError(f"the corpus must hold token ids, got {corpus.dtype}")
    if corpus.numel() < settings["prompt_len"]:
        raise ValueError(f"the corpus has {corpus.numel()} tokens, fewer than one prompt of {settings['prompt_len']}")
    config = getattr(lm, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    length = settings["prompt_len"] + settings["new_tokens"]
    if limit is not None and length > limit:
        raise ValueError(f"prompt_len + new_tokens = {length} exceeds the LM's {limit} positions")
    vocab = vocab_rows(lm) or getattr(config, "vocab_size", None)
    if vocab is not None:
        check_token_ids(corpus, vocab, what="the corpus")


@contextlib.contextmanager
def _decoding(lm: nn.Module, *, max_len: int, batch_size: int, device, dtype, compile: bool):
    """A :class:`Decoder` of ``lm`` in eval mode; ``lm``'s training mode is restored after."""
    was_training = lm.training
    lm.eval()
    try:
        yield Decoder(lm, max_len=max_len, batch_size=batch_size, device=device, dtype=dtype, compile=compile)
    finally:
        lm.train(was_training)


def _round(decoder: Decoder, corpus: torch.Tensor, prompts_generator: torch.Generator,
           sampler: torch.Generator, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One round: ``(sequences [B, P + N], kept [B])`` on the CPU, prompts drawn with
    ``prompts_generator`` and continuations sampled with ``sampler``."""
    prompt_len, batch_size = settings["prompt_len"], settings["batch_size"]
    # Not TokenBlocks.batch: its windows are training windows (two tokens at least); a prompt
    # may be a single token.
    starts = torch.randint(0, corpus.numel() - prompt_len + 1, (batch_size,), generator=prompts_generator)
    prompts = corpus[starts[:, None] + torch.arange(prompt_len)]  # [B, P]
    new = decoder.generate(prompts.to(decoder.device), settings["new_tokens"], temperature=settings["temperature"],
                           generator=sampler, top_k=settings["top_k"], top_p=settings["top_p"])  # [B, N]
    if settings["min_distinct"] > 0:
        kept = (distinct_ngram_fraction(new, 4) >= settings["min_distinct"]).cpu()  # [B]
    else:
        kept = torch.ones(batch_size, dtype=torch.bool)
    return torch.cat([prompts, new.cpu()], dim=1), kept


def _check_kept(kept: int, generated: int, rounds: int, min_distinct: float) -> None:
    if rounds >= _GIVE_UP_AFTER and kept < _GIVE_UP_KEPT * generated:
        raise ValueError(f"min_distinct={min_distinct} dropped {generated - kept} of {generated} sequences as "
                         "degenerate: lower it (or raise the temperature)")


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
    top_p: float | None = None,
    min_distinct: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """At least ``n_tokens`` tokens ``[M]``: corpus prompts and the LM's continuations.

    Rounds of ``batch_size`` sequences of ``prompt_len + new_tokens`` tokens are generated
    until ``n_tokens`` are kept (``M`` is a whole number of sequences). The prompts are
    windows of ``corpus [N]`` at offsets drawn with ``seed``; the continuations are sampled
    at ``temperature`` from the ``top_k`` most likely tokens (``top_k=None``: all; with
    ``top_p``, from the smallest set of them holding that probability) with a generator on
    the decoding device seeded with ``seed``, so a run repeats exactly on the same machine.
    A continuation whose fraction of distinct 4-grams is below ``min_distinct`` is dropped.
    ``device``, ``dtype`` and ``compile`` go to :class:`~ppn_bayes.decode.generation.Decoder`
    (static KV cache; on a GPU ``compile=True`` captures the decode step as a CUDA graph).
    """
    corpus = torch.as_tensor(corpus)
    settings = dict(n_tokens=n_tokens, prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_distinct=min_distinct)
    _check(lm, corpus, settings)
    from tqdm.auto import tqdm

    sequences, kept_tokens, generated, rounds = [], 0, 0, 0
    with _decoding(lm, max_len=prompt_len + new_tokens, batch_size=batch_size, device=device, dtype=dtype,
                   compile=compile) as decoder:
        offsets = torch.Generator().manual_seed(seed)
        sampler = torch.Generator(device=decoder.device).manual_seed(seed)
        with tqdm(total=n_tokens, disable=not progress, desc="teacher text", unit="tok", unit_scale=True) as bar:
            while kept_tokens < n_tokens:
                round_sequences, kept = _round(decoder, corpus, offsets, sampler, settings)
                sequences.append(round_sequences[kept])
                kept_tokens += sequences[-1].numel()
                generated, rounds = generated + batch_size, rounds + 1
                _check_kept(kept_tokens // round_sequences.shape[1], generated, rounds, min_distinct)
                bar.update(sequences[-1].numel())
    return torch.cat(sequences).flatten()  # [M]


def _round_seed(seed: int, round_index: int, stream: str) -> int:
    """A seed for round ``round_index``'s ``stream`` ("prompts" or "samples"): a pure
    function of the three, the two streams unrelated."""
    digest = hashlib.sha256(f"ppn_bayes.decode.lm_text:{seed}:{round_index}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def write_teacher_store(
    lm: nn.Module,
    corpus: torch.Tensor,
    out: str | Path,
    *,
    tokenizer,
    n_tokens: int,
    prompt_len: int = 32,
    new_tokens: int = 224,
    batch_size: int = 32,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    min_distinct: float = 0.5,
    source: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    progress: bool = True,
) -> TokenStore:
    """Write at least ``n_tokens`` tokens of teacher text as a token store at ``out``;
    return it opened.

    Round ``r`` (``batch_size`` sequences: ``prompt_len`` corpus tokens, then
    ``new_tokens`` sampled as in :func:`teacher_tokens`) draws its prompts and samples with
    generators seeded from ``(seed, r)`` alone; its kept sequences are appended whole, and a
    shard is written every ``shard_tokens`` tokens or a little more. With ``resume`` an
    interrupted store continues at the round after its last shard and ends as an
    uninterrupted run would (on the same device, dtype and software); a complete one is
    returned as it is. Settings, the corpus (its token count and SHA-256), the tokenizer
    and ``source`` (free JSON from the caller: the model's path, the corpus file) must then
    be those it was written with.

    ``tokenizer`` is the LM's tokenizer or its :func:`~ppn_bayes.store.tokenizer_identity`.
    The manifest's ``source`` records ``kind`` ("teacher-text"), ``corpus``, ``settings``
    and ``stats`` (``rounds``, ``sequences`` kept, ``dropped`` by the ``min_distinct``
    guard). Settings out of range, a corpus with ids outside the LM's vocabulary, or an
    existing store without ``resume`` or ``overwrite`` are refused before anything is
    generated or written.
    """
    corpus = torch.as_tensor(corpus)
    settings = dict(n_tokens=n_tokens, prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_distinct=min_distinct)
    _check(lm, corpus, settings | {"shard_tokens": shard_tokens})
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    identity = tokenizer if isinstance(tokenizer, str) else tokenizer_identity(tokenizer)
    parameter = next(lm.parameters())
    recorded = {**(source or {}), "kind": "teacher-text",
                "corpus": {"tokens": int(corpus.numel()),
                           "sha256": hashlib.sha256(corpus.long().cpu().numpy().tobytes()).hexdigest()},
                "settings": settings | {"seed": seed, "dtype": str(dtype or parameter.dtype).removeprefix("torch.")},
                "stats": {"rounds": 0, "sequences": 0, "dropped": 0}}
    vocab = vocab_rows(lm) or lm.config.vocab_size
    writer = TokenStoreWriter(out, vocab_size=vocab, tokenizer=identity, source=recorded,
                              shard_tokens=shard_tokens, resume=resume, overwrite=overwrite)
    if writer.complete:
        return TokenStore(out)
    stats = dict(writer.stats or recorded["stats"])
    per_sequence = prompt_len + new_tokens
    from tqdm.auto import tqdm

    with _decoding(lm, max_len=per_sequence, batch_size=batch_size, device=device, dtype=dtype,
                   compile=compile) as decoder:
        prompts_generator = torch.Generator()
        sampler = torch.Generator(device=decoder.device)
        with tqdm(total=n_tokens, initial=writer.tokens, disable=not progress, desc="teacher text", unit="tok",
                  unit_scale=True) as bar:
            while writer.tokens < n_tokens:
                r = stats["rounds"]
                prompts_generator.manual_seed(_round_seed(seed, r, "prompts"))
                sampler.manual_seed(_round_seed(seed, r, "samples"))
                sequences, kept = _round(decoder, corpus, prompts_generator, sampler, settings)
                n_kept = int(kept.sum())
                stats = {"rounds": r + 1, "sequences": stats["sequences"] + n_kept,
                         "dropped": stats["dropped"] + batch_size - n_kept}
                _check_kept(stats["sequences"], stats["rounds"] * batch_size, stats["rounds"], min_distinct)
                writer.append(sequences[kept].flatten(), marker={"rounds": r + 1}, stats=stats)
                bar.update(n_kept * per_sequence)
    writer.close()
    return TokenStore(out)
