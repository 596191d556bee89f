"""Fast greedy decoding: a static KV cache and a fixed-shape decode step.

Hugging Face ``generate`` is Python-overhead bound at batch 1, and its static cache did
not survive CUDA graphs on the H200 (the cache mutates a length counter inside the
graph). This module is a decode loop of our own, after gpt-fast's ``generate.py``:

* :class:`StaticKVCache` preallocates, per layer, keys and values ``[B, H_l, max_len,
  D_l]``; ``H_l`` and ``D_l`` are read from the first tensors a layer writes, so layers
  of different widths (a sub-network) each get their own shape. A forward writes its
  keys and values at the positions it is given; nothing is counted inside the graph.
* :class:`Decoder` runs the LM's own ``forward`` on that cache with explicit position
  ids and an explicit 4-D attention mask. Prefill runs eagerly; every later call (one
  token, or ``k + 1`` tokens to verify a speculative draft) has a fixed shape, so
  ``torch.compile(mode="reduce-overhead")`` captures it as a CUDA graph. Outputs are
  cloned out of the graph's memory before the next replay overwrites them.
* Rolling back is resetting :attr:`Decoder.length`: entries past it are masked out and
  overwritten by the next write.

Any LM that ``ppn_bayes`` supports (Llama, Mistral, Qwen2/3, GPT-2 families), with the
``sdpa`` or ``eager`` attention implementation, and any sub-network built from one, runs
here. :func:`timed_generate` measures tokens per second with a device sync before every
clock read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["StaticKVCache", "Decoder", "GenerationTiming", "timed_generate", "synchronize", "sample"]

SUPPORTED_ATTENTION = ("sdpa", "eager")


def synchronize(device: torch.device | str) -> None:
    """Wait for every kernel queued on ``device`` (a no-op on the CPU): call before a clock read."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":  # pragma: no cover
        torch.xpu.synchronize(device)
    elif device.type == "mps":  # pragma: no cover
        torch.mps.synchronize()


def sample(logits: torch.Tensor, *, temperature: float = 0.0, generator: torch.Generator | None = None,
           top_k: int | None = None):
    """Next tokens ``[B]`` from logits ``[B, V]``: the argmax at ``temperature == 0``, else a
    draw from ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely
    tokens when given (``top_k=1`` is the argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -- the cache -------------------------------------------------------------------------------
class _StaticKVLayer(CacheLayerMixin):
    """One layer's keys and values ``[B, H, max_len, D]``, allocated on the first write."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "StaticKVCache"):
        super().__init__()
        self._cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        length = self._cache.max_len
        self.keys = key_states.new_zeros(batch, heads, length, key_states.shape[-1])  # [B, H, S, Dk]
        self.values = value_states.new_zeros(batch, heads, length, value_states.shape[-1])  # [B, H, S, Dv]
        if not torch.compiler.is_compiling():
            # Fixed addresses: CUDA graphs then accept the in-place writes below.
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self._cache.positions  # [q]
        self.keys.index_copy_(2, positions, key_states)  # key_states: [B, H, q, Dk]
        self.values.index_copy_(2, positions, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.max_len, 0

    def get_seq_length(self) -> int:
        return self._cache.length

    def get_max_length(self) -> int:
        return self._cache.max_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class StaticKVCache(Cache):
    """A Hugging Face :class:`~transformers.cache_utils.Cache` of fixed length ``max_len``.

    Each layer's tensors are ``[B, H_l, max_len, D_l]``, shaped by that layer's first
    write (so per-layer widths are fine). A forward writes at :attr:`positions` (set by
    the :class:`Decoder` before the call); :attr:`length` (how many positions hold valid
    entries) is kept by the decoder, outside any compiled graph.
    """

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        self.max_len = int(max_len)
        self.length = 0
        self.positions: torch.Tensor | None = None
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # only during the (eager) prefill
            self.layers.append(_StaticKVLayer(self))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the allocated key and value tensors."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


# -- the decoder -----------------------------------------------------------------------------
def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


class Decoder:
    """Greedy (or sampled) decoding of ``lm`` with a static KV cache, batch ``batch_size``.

    Parameters
    ----------
    lm
        A Hugging Face causal LM (or a sub-network built from one) in eval mode.
    max_len
        Positions the cache holds: prompt plus new tokens (plus ``k + 1`` when the decoder
        verifies speculative drafts).
    batch_size
        Rows decoded together; every prompt must have this many rows.
    device, dtype
        Where and in what precision to run; when given, ``lm`` is moved there in place.
        By default, the device and dtype of ``lm``'s parameters.
    compile
        Compile the fixed-shape calls (everything after the prefill) with
        ``torch.compile(mode=compile_mode, fullgraph=True, dynamic=False)``. On a GPU,
        ``"reduce-overhead"`` captures each shape as a CUDA graph.
    compile_mode, compile_backend
        ``torch.compile``'s mode and backend (``backend="eager"`` only traces: a quick
        check that the graph captures whole).

    Notes
    -----
    Use :meth:`generate` for whole generations, or :meth:`prefill`, :meth:`step`,
    :meth:`forward` and :meth:`rollback` to drive the cache yourself (as speculative
    decoding does).
    """

    def __init__(self, lm: nn.Module, *, max_len: int, batch_size: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 compile: bool = False, compile_mode: str | None = "reduce-overhead",
                 compile_backend: str = "inductor"):
        config = getattr(lm, "config", None)
        if config is None:
            raise TypeError(f"{type(lm).__name__} has no config: pass a Hugging Face causal LM")
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {attention!r} is not supported by the static-cache decoder; "
                f"load the LM with attn_implementation='sdpa' or 'eager'"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        window = _sliding_window(config)
        if window is not None and max_len > window:
            raise ValueError(
                f"max_len={max_len} exceeds the LM's sliding window of {window} tokens, which this "
                "decoder does not implement; use max_len <= sliding_window"
            )
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len={max_len} exceeds the LM's {limit} positions")
        if device is not None or dtype is not None:
            lm.to(device=device, dtype=dtype)
        parameter = next(lm.parameters())
        self.lm = lm.eval()
        self.device = parameter.device
        self.dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
        self.batch_size = int(batch_size)
        self.max_len = int(max_len)
        self.cache = StaticKVCache(max_len)
        self._slots = torch.arange(self.max_len, device=self.device)  # [S]: every cache position
        self._compiled = None
        if compile:
            _raise_recompile_limit()
            mode = compile_mode if compile_backend == "inductor" else None
            self._compiled = torch.compile(self._forward, mode=mode, backend=compile_backend, fullgraph=True,
                                           dynamic=False)

    # -- state ---------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Positions of the cache that hold valid entries (the next write goes here)."""
        return self.cache.length

    def rollback(self, length: int) -> None:
        """Forget everything from position ``length`` on (entries past it are masked out
        and overwritten by the next write)."""
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.cache.length} positions")
        self.cache.length = int(length)

    def reset(self) -> None:
        """Start over (the cache tensors stay allocated, at the same addresses)."""
        self.cache.length = 0

    # -- forwards ------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, last_only: bool = False):
        """Logits ``[B, q, V]`` (``[B, 1, V]`` if ``last_only``) of ``input_ids [B, q]`` at
        cache positions ``positions [q]``, writing their keys and values there."""
        batch, q = input_ids.shape
        self.cache.positions = positions
        allowed = self._slots[None, :] <= positions[:, None]  # [q, S]: causal over the cache
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)
        mask = mask[None, None].expand(batch, 1, q, self.max_len)  # [B, 1, q, S], additive
        out = self.lm(
            input_ids=input_ids,
            position_ids=positions[None, :].expand(batch, q),  # [B, q]
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits

    def _check(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"input_ids must be [batch_size={self.batch_size}, T], got {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] < 1:
            raise ValueError("input_ids is empty: give at least one token")
        if self.length + input_ids.shape[1] > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} positions: {self.length} used, "
                f"{input_ids.shape[1]} more do not fit; build the Decoder with a larger max_len"
            )
        return input_ids.to(self.device)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a sequence: run the prompt ``input_ids [B, T]`` (eagerly, whatever its
        length) from position 0 and return the logits of its last token ``[B, V]``."""
        self.reset()
        input_ids = self._check(input_ids)
        T = input_ids.shape[1]
        logits = self._forward(input_ids, self._slots[:T], last_only=True)
        self.cache.length = T
        return logits[:, -1]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, q, V]`` of ``input_ids [B, q]`` placed at positions ``length ..
        length + q - 1``; advances :attr:`length` by ``q``. The compiled path when the
        decoder was built with ``compile=True``."""
        input_ids = self._check(input_ids)
        start, q = self.length, input_ids.shape[1]
        positions = self._slots[start:start + q]  # [q]
        if self._compiled is None:
            logits = self._forward(input_ids, positions)
        else:
            # Clone out of the CUDA graph's memory: the next replay overwrites its outputs.
            logits = self._compiled(input_ids, positions).clone()
        self.cache.length = start + q
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: logits ``[B, V]`` after ``tokens [B]`` (or ``[B, 1]``)."""
        return self.forward(tokens.reshape(self.batch_size, 1))[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None, top_k: int | None = None) -> torch.Tensor:
        """New tokens ``[B, max_new_tokens]`` after the prompt ``input_ids [B, T]``: greedy
        at ``temperature == 0`` (the default), else sampled (with ``generator``, from the
        ``top_k`` most likely tokens when given)."""
        return self._generate(input_ids, max_new_tokens, temperature=temperature, generator=generator,
                              top_k=top_k)[0]

    def _generate(self, input_ids, max_new_tokens, *, temperature=0.0, generator=None, top_k=None):
        """``(tokens [B, N], seconds of the prefill, seconds in all)``, synchronised clocks."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        needed = input_ids.shape[-1] + max_new_tokens - 1  # the last new token is never cached
        if needed > self.max_len:
            raise ValueError(
                f"a prompt of {input_ids.shape[-1]} tokens and {max_new_tokens} new tokens need "
                f"{needed} positions; the cache holds {self.max_len}"
            )
        synchronize(self.device)
        start = time.perf_counter()
        token = sample(self.prefill(input_ids), temperature=temperature, generator=generator, top_k=top_k)  # [B]
        synchronize(self.device)
        prefilled = time.perf_counter()
        tokens = [token]
        for _ in range(max_new_tokens - 1):
            token = sample(self.step(token), temperature=temperature, generator=generator, top_k=top_k)
            tokens.append(token)
        tokens = torch.stack(tokens, dim=1)  # [B, N]
        synchronize(self.device)
        return tokens, prefilled - start, time.perf_counter() - start


def _raise_recompile_limit(at_least: int = 64) -> None:
    """Each distinct shape (one token, ``k + 1`` tokens for each ``k``) is its own graph."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), at_least))
            return


# -- timing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationTiming:
    """Tokens and speed of one timed generation.

    ``tokens [B, N]`` are the new tokens; ``seconds`` covers prefill and decoding;
    ``tokens_per_s`` is ``B * N / seconds``; ``decode_tokens_per_s`` leaves the prefill
    (and the first token it yields) out.
    """

    tokens: torch.Tensor
    seconds: float
    prefill_seconds: float
    tokens_per_s: float
    decode_tokens_per_s: float

    def to_dict(self) -> dict:
        """The figures, without the tokens."""
        record = asdict(self)
        record.pop("tokens")
        record["new_tokens"] = int(self.tokens.shape[1])
        record["batch_size"] = int(self.tokens.shape[0])
        return record


@torch.no_grad()
def timed_generate(decoder: Decoder, input_ids: torch.Tensor, max_new_tokens: int, *,
                   warmup: int = 1) -> GenerationTiming:
    """Greedy :meth:`Decoder.generate` timed, after ``warmup`` untimed runs (which also
    compile, when the decoder compiles). The device is synchronised before every clock read."""
    for _ in range(warmup):
        decoder.generate(input_ids, max_new_tokens)
    tokens, prefill, seconds = decoder._generate(input_ids, max_new_tokens)
    batch, n = tokens.shape
    decode = seconds - prefill
    return GenerationTiming(
        tokens=tokens.cpu(),
        seconds=seconds,
        prefill_seconds=prefill,
        tokens_per_s=batch * n / seconds,
        decode_tokens_per_s=batch * (n - 1) / decode if n > 1 and decode > 0 else float("nan"),
    )
