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

Batched sampling (teacher text) is where speed matters most, and two things make it fast:

* **Grouped attention in place** (:func:`grouped_attention`, registered with transformers'
  ``AttentionInterface`` as ``"ppn_grouped"``). With a mask, transformers' SDPA path (and
  its eager path) expands the key/value groups to one per query head (``repeat_kv``) over
  the whole static cache, in every layer at every step: for SmolLM2 (3 groups, 9 heads)
  three times the cache in copies, which bounded sampling at about 45k tokens/s on an
  H200 whatever the batch. ``torch``'s own ``scaled_dot_product_attention(...,
  enable_gqa=True)`` is no way out: with an ``attn_mask`` it runs on the math backend,
  which repeats the groups itself (only the flash backend takes grouped heads, and it takes
  no mask). :func:`grouped_attention` views the query heads of a group as rows of one
  matrix, ``[B, KV, G * q, D]``, and multiplies it with the unexpanded cache ``[B, KV, D,
  S]``: the keys and values are read once, where they lie. The :class:`Decoder` switches
  the LM to it around its own calls (``grouped_attention=True``, the default) and restores
  the LM's implementation after each.
* **The whole decode step, sampling included, in one compiled function**
  (:meth:`Decoder.generate`): the step reads the last token from a preallocated sequence
  buffer, computes the last position's logits, draws the next token by Gumbel-max
  (:func:`sample_tokens`: temperature, top-k, top-p on the top-k set) from uniform noise
  that the caller's seeded generator writes into a fixed buffer before the step, and
  writes the token into the sequence buffer. The step has no outputs and reads nothing
  back to the host, so with ``torch.compile(mode="reduce-overhead")`` every step is one
  CUDA graph replay and the loop never waits for the device; a seeded run repeats exactly.

:func:`distinct_ngram_fraction` is the cheap guard against degenerate samples (repeated
n-grams), computed on the device.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, eager_mask

__all__ = ["StaticKVCache", "Decoder", "GenerationTiming", "timed_generate", "synchronize", "sample",
           "sample_tokens", "check_sampling", "noise_width", "grouped_attention", "GROUPED_ATTENTION", "distinct_ngram_fraction"]

SUPPORTED_ATTENTION = ("sdpa", "eager")
GROUPED_ATTENTION = "ppn_grouped"


def synchronize(device: torch.device | str) -> None:
    """Wait for every kernel queued on ``device`` (a no-op on the CPU): call before a clock read."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":  # pragma: no cover
        torch.xpu.synchronize(device)
    elif device.type == "mps":  # pragma: no cover
        torch.mps.synchronize()


# -- sampling ----------------------------------------------------------------------------------
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` naming a sampling setting out of range."""
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (None: every token), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (None: no nucleus cut), got {top_p}")


def noise_width(vocab: int, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None) -> int:
    """Uniform draws per row that :func:`sample_tokens` needs: ``top_k`` (the candidates),
    ``vocab`` without a top-k cut, 0 when greedy."""
    if temperature == 0:
        return 0
    return top_k if top_k is not None and top_k < vocab else vocab


def sample_tokens(logits: torch.Tensor, noise: torch.Tensor | None = None, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` from logits ``[B, V]`` and uniform noise ``[B, W]`` in [0, 1)
    (``W`` = :func:`noise_width`), by Gumbel-max; a pure function, so it compiles into the
    decode step and the noise can come from a seeded generator outside the graph.

    At ``temperature == 0`` the argmax (``noise`` unused). Else the candidates are the
    ``top_k`` most likely tokens (all tokens when ``top_k`` is None or at least ``V``); with
    ``top_p``, only the most likely candidates whose probability mass, renormalised over the
    candidates at ``temperature``, before them is below ``top_p`` (the smallest prefix of
    mass at least ``top_p``; the most likely is always kept). The token is the candidate
    maximising ``logit / temperature - log(-log(u))``: a draw from the softmax over the
    kept candidates at ``temperature`` (Gumbel-max), ``u`` the candidate's noise in order of
    decreasing probability (noise column ``j`` goes with the ``j``-th most likely candidate;
    without a top-k or top-p cut, with token ``j``).
    """
    if temperature == 0:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    gumbel = -torch.log(-torch.log(noise))  # [B, W]; u = 0 gives -inf: never chosen
    if (top_k is None or top_k >= vocab) and top_p is None:
        return (logits.float() / temperature + gumbel).argmax(-1)
    values, indices = logits.topk(min(top_k or vocab, vocab), dim=-1)  # [B, K], most likely first
    scores = values.float() / temperature
    if top_p is not None:
        probs = torch.softmax(scores, dim=-1)
        before = probs.cumsum(-1) - probs  # [B, K]: the mass of the more likely candidates
        scores = scores.masked_fill(before >= top_p, float("-inf"))
    choice = (scores + gumbel).argmax(-1, keepdim=True)  # [B, 1]
    return indices.gather(-1, choice)[:, 0]


def sample(logits: torch.Tensor, *, temperature: float = 0.0, generator: torch.Generator | None = None,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` from logits ``[B, V]``: the argmax at ``temperature == 0``, else a
    draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
    tokens and the ``top_p`` nucleus among them (``top_k=1`` is the argmax), with noise
    drawn from ``generator``: :func:`sample_tokens` with fresh noise."""
    check_sampling(temperature, top_k, top_p)
    width = noise_width(logits.shape[-1], temperature=temperature, top_k=top_k, top_p=top_p)
    noise = None
    if width:
        noise = torch.rand(logits.shape[0], width, generator=generator, device=logits.device)  # [B, W]
    return sample_tokens(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)


def distinct_ngram_fraction(tokens: torch.Tensor, n: int = 4) -> torch.Tensor:
    """The fraction of distinct ``n``-grams among the ``N - n + 1`` of each row of
    ``tokens [B, N]``: ``[B]`` float32, on ``tokens``' device (1 for a row that never
    repeats an ``n``-gram; near 0 for a row stuck in a loop). Exact for any vocabulary:
    the ``n``-grams of each row are sorted lexicographically (``n`` stable sorts, last
    position first) and the changes between neighbours counted."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, N], got shape {tuple(tokens.shape)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if tokens.shape[1] < n:
        raise ValueError(f"rows of {tokens.shape[1]} tokens hold no {n}-gram")
    grams = tokens.unfold(1, n, 1)  # [B, M, n]
    order = torch.arange(grams.shape[1], device=tokens.device).expand(grams.shape[:2])  # [B, M]
    for j in reversed(range(n)):  # least significant position first: stable sorts make it lexicographic
        keys = grams[:, :, j].gather(1, order)
        order = order.gather(1, keys.sort(dim=1, stable=True).indices)
    ordered = grams.gather(1, order[:, :, None].expand(grams.shape))  # [B, M, n]
    changes = (ordered[:, 1:] != ordered[:, :-1]).any(-1).sum(1)  # [B]
    return (changes + 1).float() / grams.shape[1]


# -- attention -------------------------------------------------------------------------------
def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Grouped-query attention that reads keys and values where they lie.

    ``query [B, H, q, D]``, ``key [B, KV, S, D]``, ``value [B, KV, S, Dv]`` with ``H = KV *
    G``; query head ``h`` attends with key/value group ``h // G`` (transformers'
    ``repeat_kv`` order). Returns ``(output [B, q, H, Dv], None)``, transformers' attention
    function signature (registered as :data:`GROUPED_ATTENTION`). ``attention_mask`` is
    additive ``[B or 1, 1, q, >= S]`` (as transformers' eager masks and the
    :class:`Decoder`'s) or boolean (True: attend).

    The ``G`` heads of a group become ``G * q`` rows of one matrix, ``[B, KV, G * q, D]``
    (a view when ``q == 1``), multiplied with the keys as they lie, ``[B, KV, D, S]``, and
    the weights with the values ``[B, KV, S, Dv]``: two batched matrix products that read
    the cache once, where transformers' paths first copy it ``G`` times (and
    ``scaled_dot_product_attention(..., enable_gqa=True)`` with a mask does the same on its
    math backend). The arithmetic is the eager path's: scores in the inputs' dtype, scaled,
    the mask added, softmax in float32, cast back, times the values.
    """
    if dropout and module.training:
        raise ValueError("grouped_attention has no dropout: use it in eval mode")
    batch, heads, q, dim = query.shape
    groups = key.shape[1]
    dv = value.shape[-1]
    if groups == 0 or heads == 0:  # a sub-network layer that kept no attention unit
        return query.new_zeros(batch, q, heads, dv), None
    if heads % groups:
        raise ValueError(f"{heads} query heads do not split into {groups} key/value groups")
    per_group = heads // groups
    length = key.shape[2]
    if scaling is None:
        scaling = dim ** -0.5
    rows = query.reshape(batch, groups, per_group * q, dim)  # [B, KV, G*q, D]
    scores = torch.matmul(rows, key.transpose(2, 3)) * scaling  # [B, KV, G*q, S]
    if attention_mask is not None:
        mask = attention_mask[..., :length]  # [B|1, 1|H, q, S]
        if mask.shape[1] == 1:
            mask = mask[:, :, None]  # [B|1, 1, 1, q, S]
        else:
            mask = mask.reshape(mask.shape[0], groups, per_group, q, length)
        scores = scores.view(batch, groups, per_group, q, length)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
        scores = scores.view(batch, groups, per_group * q, length)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value)  # [B, KV, G*q, Dv]
    return out.view(batch, heads, q, dv).transpose(1, 2), None  # [B, q, H, Dv]


AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
# An LM switched to it builds, from 2-D or absent masks, the eager path's additive 4-D masks.
AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)


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
        visible = self._cache.visible
        if visible is None:
            return self.keys, self.values
        return self.keys[:, :, :visible], self.values[:, :, :visible]  # [B, H, visible, D]

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
    the :class:`Decoder` before the call) and attends to the first :attr:`visible`
    positions (all when None); :attr:`length` (how many positions hold valid entries) is
    kept by the decoder, outside any compiled graph.
    """

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        self.max_len = int(max_len)
        self.length = 0
        self.positions: torch.Tensor | None = None
        self.visible: int | None = None
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
    grouped_attention
        Run the LM's attention with :func:`grouped_attention` (keys and values read in
        place, no per-head copies of the cache) during the decoder's calls; the LM's own
        implementation is restored after each. ``False``: the LM's own attention.
    cache_block
        In :meth:`generate`'s decode steps, attend to the cache only up to the next
        multiple of ``cache_block`` past the current position (at most ``max_len``)
        instead of all ``max_len`` positions: less to read early in a generation, at the
        cost of one compiled graph per multiple. None (the default): always all.

    Notes
    -----
    Use :meth:`generate` for whole generations (its decode step samples inside the
    compiled function), or :meth:`prefill`, :meth:`step`, :meth:`forward` and
    :meth:`rollback` to drive the cache yourself (as speculative decoding does).
    """

    def __init__(self, lm: nn.Module, *, max_len: int, batch_size: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 compile: bool = False, compile_mode: str | None = "reduce-overhead",
                 compile_backend: str = "inductor", grouped_attention: bool = True,
                 cache_block: int | None = None):
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
        if cache_block is not None and cache_block < 1:
            raise ValueError(f"cache_block must be at least 1 (None: the whole cache), got {cache_block}")
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
        self.grouped_attention = bool(grouped_attention)
        self.cache_block = cache_block
        self._slots = torch.arange(self.max_len, device=self.device)  # [S]: every cache position
        self._sequence: torch.Tensor | None = None  # [B, max_len + 1]: prompt and new tokens
        self._noise: dict[int, torch.Tensor] = {}  # width -> [B, width] uniform noise
        self._compiled = None
        self._compiled_step = None
        if compile:
            _raise_recompile_limit()
            mode = compile_mode if compile_backend == "inductor" else None
            options = dict(mode=mode, backend=compile_backend, fullgraph=True, dynamic=False)
            self._compiled = torch.compile(self._forward, **options)
            self._compiled_step = torch.compile(self._sample_step, **options)

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

    @contextlib.contextmanager
    def _attention(self):
        """The LM runs :func:`grouped_attention` inside, its own implementation after."""
        if not self.grouped_attention:
            yield
            return
        config = self.lm.config
        own = config._attn_implementation
        config._attn_implementation = GROUPED_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = own

    def _static_buffer(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.zeros(shape, dtype=dtype, device=self.device)
        torch._dynamo.mark_static_address(buffer)  # CUDA graphs read and write it in place
        return buffer

    # -- forwards ------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, last_only: bool = False,
                 visible: int | None = None):
        """Logits ``[B, q, V]`` (``[B, 1, V]`` if ``last_only``) of ``input_ids [B, q]`` at
        cache positions ``positions [q]``, writing their keys and values there; attending
        to the first ``visible`` cache positions (all when None)."""
        batch, q = input_ids.shape
        length = visible or self.max_len
        self.cache.positions = positions
        self.cache.visible = visible
        allowed = self._slots[None, :length] <= positions[:, None]  # [q, S]: causal over the cache
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)
        mask = mask[None, None].expand(batch, 1, q, length)  # [B, 1, q, S], additive
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
        with self._attention():
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
        with self._attention():
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

    def _sample_step(self, sequence: torch.Tensor, positions: torch.Tensor, noise: torch.Tensor | None,
                     temperature: float, top_k: int | None, top_p: float | None,
                     visible: int | None = None) -> None:
        """One decode step in place: the token at ``sequence[:, p]`` (``positions == [p]``)
        goes through the LM at cache position ``p`` (attending to the first ``visible``
        positions), and the token drawn from its logits (:func:`sample_tokens` with ``noise
        [B, W]``) is written to ``sequence[:, p + 1]``. Nothing is returned: a CUDA graph of
        it has no outputs to copy out."""
        ids = sequence.index_select(1, positions)  # [B, 1]
        logits = self._forward(ids, positions, last_only=True, visible=visible)[:, -1]  # [B, V]
        token = sample_tokens(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)  # [B]
        sequence.index_copy_(1, positions + 1, token[:, None])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> torch.Tensor:
        """New tokens ``[B, max_new_tokens]`` after the prompt ``input_ids [B, T]``: greedy
        at ``temperature == 0`` (the default), else sampled at ``temperature`` from the
        ``top_k`` most likely tokens (all when None) and, with ``top_p``, the nucleus among
        them (:func:`sample_tokens`), with uniform noise drawn from ``generator`` (on the
        decoder's device; the default generator when None): one ``[B, W]`` draw a token,
        so a seeded generator repeats a generation exactly.

        The prefill runs eagerly; every later token is one call of the decode step (the
        compiled one when the decoder compiles), which samples inside and writes into a
        preallocated buffer: the loop never reads from the device.
        """
        return self._generate(input_ids, max_new_tokens, temperature=temperature, generator=generator,
                              top_k=top_k, top_p=top_p)[0]

    @torch.no_grad()
    def _generate(self, input_ids, max_new_tokens, *, temperature=0.0, generator=None, top_k=None, top_p=None):
        """``(tokens [B, N], seconds of the prefill, seconds in all)``, synchronised clocks."""
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        T = input_ids.shape[-1]
        needed = T + max_new_tokens - 1  # the last new token is never cached
        if needed > self.max_len:
            raise ValueError(
                f"a prompt of {input_ids.shape[-1]} tokens and {max_new_tokens} new tokens need "
                f"{needed} positions; the cache holds {self.max_len}"
            )
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"the generator is on {generator.device}, the decoder on {self.device}: "
                             "draw the noise on the decoder's device")
        if self._sequence is None:
            self._sequence = self._static_buffer(self.batch_size, self.max_len + 1, dtype=torch.long)
        sequence = self._sequence
        step = self._compiled_step or self._sample_step
        synchronize(self.device)
        start = time.perf_counter()
        logits = self.prefill(input_ids)  # [B, V]
        vocab = logits.shape[-1]
        if top_k is not None and top_k >= vocab:
            top_k = None  # every token is a candidate
        settings = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
        width = noise_width(vocab, **settings)
        if width and width not in self._noise:
            self._noise[width] = self._static_buffer(self.batch_size, width, dtype=torch.float32)
        noise = self._noise.get(width)
        sequence[:, :T] = input_ids
        if noise is not None:
            noise.uniform_(generator=generator)
        sequence[:, T] = sample_tokens(logits, noise, **settings)
        synchronize(self.device)
        prefilled = time.perf_counter()
        block = self.cache_block
        try:
            with self._attention():
                for position in range(T, needed):
                    if noise is not None:
                        noise.uniform_(generator=generator)
                    visible = None if block is None else min(self.max_len, (position // block + 1) * block)
                    step(sequence, self._slots[position:position + 1], noise, settings["temperature"], top_k,
                         top_p, visible)
        finally:
            self.cache.visible = None  # the other forwards attend to the whole cache
        self.cache.length = needed
        tokens = sequence[:, T:T + max_new_tokens].clone()  # [B, N]
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
