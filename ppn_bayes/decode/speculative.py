"""Speculative decoding with push puppet sub-networks as drafts.

A sub-network of the target is the same network pressed smaller, so it tends to predict
what the target predicts. Each step of :func:`speculative_generate` (after gpt-fast's
``generate.py``):

1. the draft proposes ``k`` tokens, one decode step each;
2. the target scores the last emitted token and the ``k`` proposals in one pass over
   ``k + 1`` positions;
3. the longest prefix of proposals the target agrees with is accepted, and the target's
   own token at the first disagreement (or after the last proposal) is appended, so every
   step emits between 1 and ``k + 1`` tokens;
4. both static caches roll back to the accepted length: resetting a position, no copy.

Greedy (``temperature == 0``): a proposal is accepted when it is the target's argmax, so
the output equals plain greedy decoding of the target token for token (up to the
rounding of a ``k + 1``-token pass against one-token passes). Sampling: the exact rule of
Leviathan et al. and Chen et al., accept proposal ``x`` with probability
``min(1, p(x) / q(x))``, on rejection draw from ``norm(max(0, p - q))``, so the output is
distributed as the target's samples.

Also here: :func:`check_draft` (a draft must share the target's vocabulary),
:func:`assisted_generate` (the same drafts through Hugging Face's own assisted
generation), :func:`choose_draft` (measure acceptance and speed over sizes and ``k`` and
recommend a pair) and :func:`shared_draft` (a draft whose weights are prefix views of a
rank-sorted target: no new memory).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import nn

from ..deploy.artifacts import RankedLM, open_ranked_lm
from ..lm import check_same_vocabulary
from .generation import Decoder, sample, synchronize

if TYPE_CHECKING:
    from ..core.ranking import Ranking

__all__ = [
    "Speculation", "speculative_generate", "accept_greedy", "accept_sampled", "check_draft",
    "assisted_generate", "DraftTrial", "DraftChoice", "choose_draft", "rank_sorted", "shared_draft",
    "new_parameter_bytes", "Target", "load_target", "prompts_from_tokens",
]


# -- compatibility ---------------------------------------------------------------------------
def _tokenizer_vocab(tokenizer) -> dict:
    if hasattr(tokenizer, "get_vocab"):
        return dict(tokenizer.get_vocab())
    if hasattr(tokenizer, "alphabet"):  # ppn_bayes.data.CharTokenizer
        return {c: i for i, c in enumerate(tokenizer.alphabet)}
    raise TypeError(f"cannot read the vocabulary of a {type(tokenizer).__name__}")


def check_draft(target: nn.Module, draft: nn.Module, *, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ``ValueError`` unless ``draft`` can draft for ``target``: the same vocabulary
    size (config and output rows) and, when both tokenizers are given, the same vocabulary
    (token to id)."""
    check_same_vocabulary(target, draft, names=("target", "draft"), why="a draft must use the target's tokenizer")
    if (target_tokenizer is None) != (draft_tokenizer is None):
        raise ValueError("give both tokenizers (target_tokenizer and draft_tokenizer) or neither")
    if target_tokenizer is not None and target_tokenizer is not draft_tokenizer:
        ours, theirs = _tokenizer_vocab(target_tokenizer), _tokenizer_vocab(draft_tokenizer)
        if ours != theirs:
            differ = sorted(set(ours.items()) ^ set(theirs.items()), key=str)[:3]
            raise ValueError(
                f"the draft's tokenizer differs from the target's ({len(theirs)} against {len(ours)} "
                f"tokens; e.g. {differ}): a draft must use the target's tokenizer"
            )


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"the draft length k must be an integer of at least 1, got {k!r}")
    return int(k)


# -- acceptance rules ------------------------------------------------------------------------
def accept_greedy(target_logits: torch.Tensor, proposed: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Greedy verification.

    ``target_logits [k + 1, V]`` are the target's logits at the last emitted token and at
    each of the ``k`` proposals ``proposed [k]``. Returns ``(n, token)``: the number of
    proposals accepted (those equal to the target's argmax, up to the first that is not)
    and the target's own next token ``[1]`` after them.
    """
    choice = target_logits.argmax(-1)  # [k + 1]
    k = proposed.shape[0]
    agree = (choice[:k] == proposed).long()  # [k]
    n = int(agree.cumprod(0).sum())  # one device sync a step
    return n, choice[n:n + 1]


def accept_sampled(target_probs: torch.Tensor, draft_probs: torch.Tensor, proposed: torch.Tensor, *,
                   generator: torch.Generator | None = None) -> tuple[int, torch.Tensor]:
    """The exact speculative sampling rule.

    ``target_probs [k + 1, V]`` (``p``) and ``draft_probs [k, V]`` (``q``) at each
    position; ``proposed [k]`` drawn from ``q``. Proposal ``i`` is accepted with
    probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the next token is
    drawn from ``norm(max(0, p_i - q_i))``, and after ``k`` acceptances from ``p_k``.
    Returns ``(n, token [1])``. Then every emitted token is distributed as the target's.
    """
    k = proposed.shape[0]
    rows = torch.arange(k, device=proposed.device)
    p = target_probs[rows, proposed]  # [k]
    q = draft_probs[rows, proposed]  # [k]
    uniform = torch.rand(k, generator=generator, device=target_probs.device, dtype=target_probs.dtype)
    accepted = (uniform * q < p).long()  # u < p/q, without dividing (q > 0: x was drawn from q)
    n = int(accepted.cumprod(0).sum())
    if n == k:
        dist = target_probs[k]
    else:
        dist = (target_probs[n] - draft_probs[n]).clamp_min(0)  # [V]
        if not float(dist.sum()) > 0:  # p == q up to rounding: a rejection is then (nearly) impossible
            dist = target_probs[n]
    return n, torch.multinomial(dist / dist.sum(), 1, generator=generator)


# -- the loop ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speculation:
    """What one speculative generation did.

    ``tokens [1, N]`` are the new tokens. Each of the ``steps`` target passes checked
    ``k`` proposals; ``histogram[n]`` counts the passes that accepted ``n`` of them
    (``n = 0 .. k``). ``acceptance_rate`` is accepted / proposed, ``mean_accepted`` the
    accepted proposals per pass, ``tokens_per_step`` the tokens emitted per target pass
    (``mean_accepted + 1``). ``seconds`` covers both prefills and all steps, with a
    device sync before each clock read.
    """

    tokens: torch.Tensor
    k: int
    steps: int
    histogram: tuple[int, ...]
    seconds: float
    temperature: float = 0.0

    @property
    def accepted(self) -> int:
        return sum(n * count for n, count in enumerate(self.histogram))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / (self.k * self.steps) if self.steps else float("nan")

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else float("nan")

    @property
    def tokens_per_step(self) -> float:
        return self.mean_accepted + 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens.shape[1] / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        """The record: acceptance histogram, rates, speed (no tokens)."""
        return {
            "k": self.k, "steps": self.steps, "histogram": list(self.histogram),
            "acceptance_rate": self.acceptance_rate, "mean_accepted": self.mean_accepted,
            "tokens_per_step": self.tokens_per_step, "new_tokens": int(self.tokens.shape[1]),
            "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "temperature": self.temperature,
        }


def _decoder(lm_or_decoder, max_len: int, **options) -> Decoder:
    if isinstance(lm_or_decoder, Decoder):
        if lm_or_decoder.max_len < max_len:
            raise ValueError(
                f"this generation needs {max_len} cache positions; the decoder holds {lm_or_decoder.max_len}"
            )
        if lm_or_decoder.batch_size != 1:
            raise ValueError("speculative decoding runs at batch size 1: build the Decoder with batch_size=1")
        return lm_or_decoder
    return Decoder(lm_or_decoder, max_len=max_len, batch_size=1, **options)


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int, *, k: int,
                         temperature: float = 0.0, generator: torch.Generator | None = None,
                         verify_len: int | None = None, **decoder_options) -> Speculation:
    """Generate ``max_new_tokens`` after ``input_ids [1, T]`` with ``draft`` drafting ``k``
    tokens a step for ``target``.

    ``target`` and ``draft`` are :class:`~ppn_bayes.decode.generation.Decoder` objects (reuse
    them across calls: compiled graphs and caches are kept) or LMs, then wrapped in
    decoders built with ``decoder_options`` (``compile``, ``device``, ``dtype``). Greedy
    at ``temperature == 0``; else sampled with the exact acceptance rule, drawing from
    ``generator`` (on the decoders' device). Only batch size 1 is supported.

    ``verify_len`` pads every verification pass to that many tokens (at least ``k + 1``;
    the padding's logits are ignored and its cache entries overwritten later), so that
    one compiled target graph serves every ``k`` up to ``verify_len - 1``.
    """
    k = _check_k(k)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding runs one sequence at a time: input_ids must be [1, T], got "
            f"{tuple(input_ids.shape)}"
        )
    if verify_len is not None and verify_len < k + 1:
        raise ValueError(f"verify_len={verify_len} is shorter than the k + 1 = {k + 1} tokens a pass verifies")
    verify = verify_len or k + 1
    # Worst case: the last step starts at T + max_new_tokens - 2 and writes `verify` positions.
    needed = input_ids.shape[1] + max_new_tokens + verify - 1
    target = _decoder(target, needed, **decoder_options)
    draft = _decoder(draft, needed, **decoder_options)
    check_draft(target.lm, draft.lm)
    if target.device != draft.device:
        raise ValueError(f"the target runs on {target.device}, the draft on {draft.device}: use one device")

    histogram = [0] * (k + 1)
    steps = 0
    synchronize(target.device)
    start = time.perf_counter()
    first = target.prefill(input_ids)  # [1, V]
    draft.prefill(input_ids)
    token = sample(first, temperature=temperature, generator=generator)  # [1]: emitted, not yet cached
    emitted = [token]
    count = 1
    while count < max_new_tokens:
        position = target.length  # == draft.length: where `token` goes
        # 1. Draft k tokens.
        proposals, draft_logits = [], []
        last = token
        for _ in range(k):
            logits = draft.step(last)  # [1, V]
            last = sample(logits, temperature=temperature, generator=generator)  # [1]
            proposals.append(last)
            draft_logits.append(logits)
        proposed = torch.cat(proposals)  # [k]
        # 2. Verify them in one target pass over k + 1 positions.
        block = torch.cat([token, proposed])  # [k + 1]
        if verify > k + 1:
            block = torch.cat([block, block[-1:].expand(verify - k - 1)])  # [verify]
        target_logits = target.forward(block[None])[0, :k + 1]  # [k + 1, V]
        # 3. Accept.
        if temperature == 0:
            n, token = accept_greedy(target_logits, proposed)
        else:
            p = torch.softmax(target_logits.float() / temperature, dim=-1)  # [k + 1, V]
            q = torch.softmax(torch.cat(draft_logits).float() / temperature, dim=-1)  # [k, V]
            n, token = accept_sampled(p, q, proposed, generator=generator)
        if n == k:  # the draft has not cached its last proposal yet
            draft.step(proposed[-1:])
        # 4. Roll both caches back to the accepted length.
        target.rollback(position + n + 1)
        draft.rollback(position + n + 1)
        emitted += [proposed[:n], token]
        count += n + 1
        histogram[n] += 1
        steps += 1
    tokens = torch.cat(emitted)[:max_new_tokens][None]  # [1, N]
    synchronize(target.device)
    seconds = time.perf_counter() - start
    return Speculation(tokens=tokens.cpu(), k=k, steps=steps, histogram=tuple(histogram), seconds=seconds,
                       temperature=float(temperature))


# -- Hugging Face assisted generation ----------------------------------------------------------
@torch.no_grad()
def assisted_generate(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                      k: int, stop_at_eos: bool = False, **generate_options) -> torch.Tensor:
    """New tokens ``[1, N]`` from Hugging Face's assisted generation (greedy):
    ``target.generate(input_ids, assistant_model=draft, do_sample=False, ...)`` with a
    constant draft length ``k``.

    This is how a sub-network drops into existing ``generate`` code. ``stop_at_eos=False``
    (the default) generates exactly ``max_new_tokens`` (as :func:`speculative_generate`
    does); extra keyword arguments go to ``generate``.
    """
    k = _check_k(k)
    check_draft(target, draft)
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(next(target.parameters()).device)
    options = dict(do_sample=False, max_new_tokens=max_new_tokens)
    if not stop_at_eos:
        options.update(eos_token_id=None)
    pad = target.generation_config.pad_token_id
    if pad is None:
        pad = target.generation_config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
    options["pad_token_id"] = pad if pad is not None else 0
    options.update(generate_options)
    out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), assistant_model=draft, **options)
    return out[:, input_ids.shape[1]:]


# -- choosing the draft -------------------------------------------------------------------------
@dataclass(frozen=True)
class DraftTrial:
    """Speculative decoding with the draft of one size and one ``k``, over all prompts.

    ``speedup`` is ``tokens_per_s`` over plain greedy decoding of the target measured in
    the same run; ``identical`` says whether every prompt's output equals plain greedy
    decoding token for token; ``draft_tokens_per_s`` is the draft's own plain greedy speed
    (what one drafted token costs).
    """

    size_requested: float
    size_reached: float
    k: int
    acceptance_rate: float
    mean_accepted: float
    tokens_per_step: float
    tokens_per_s: float
    speedup: float
    identical: bool
    steps: int
    histogram: tuple[int, ...]
    new_tokens: int
    seconds: float
    draft_params: int
    draft_tokens_per_s: float

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        record = asdict(self)
        record["histogram"] = list(self.histogram)
        return record


@dataclass(frozen=True)
class DraftChoice:
    """All trials of :func:`choose_draft`, the target's own speed, and the recommendation:
    the fastest trial whose output equals plain greedy decoding (the fastest of all if
    none does) is ``best``; it is recommended only when it beats plain greedy decoding
    (``beats_plain``), and otherwise ``warning`` says that no draft does."""

    trials: tuple[DraftTrial, ...]
    baseline_tokens_per_s: float
    baseline_seconds: float
    new_tokens: int
    prompts: int
    device: str
    compiled: bool
    best: DraftTrial | None = field(init=False)

    def __post_init__(self):
        identical = [t for t in self.trials if t.identical] or list(self.trials)
        best = max(identical, key=lambda t: (t.tokens_per_s, -t.size_requested, -t.k), default=None)
        object.__setattr__(self, "best", best)

    @property
    def beats_plain(self) -> bool:
        """Whether the best trial is faster than plain greedy decoding of the target."""
        return self.best is not None and self.best.speedup > 1.0

    @property
    def warning(self) -> str | None:
        """``None`` when a draft beats plain greedy decoding; otherwise the sentence that says
        none does, with the fastest trial's speed."""
        if self.beats_plain:
            return None
        if self.best is None:
            return "no draft was measured: decode without one"
        return (f"no draft beats plain greedy decoding here: the fastest, size {self.best.size_requested:g} with "
                f"k {self.best.k}, runs at {self.best.speedup:.2f}x; decode without a draft")

    def to_dict(self) -> dict:
        """A JSON-ready dict: settings, baseline, every trial, the best trial (with
        ``beats_plain``: whether it is faster than plain greedy decoding, i.e. recommended)
        and the warning (``None`` when a draft beats plain greedy decoding)."""
        return {
            "baseline_tokens_per_s": self.baseline_tokens_per_s, "baseline_seconds": self.baseline_seconds,
            "new_tokens": self.new_tokens, "prompts": self.prompts, "device": self.device,
            "compiled": self.compiled, "trials": [t.to_dict() for t in self.trials],
            "best": None if self.best is None else {"size": self.best.size_requested, "k": self.best.k,
                                                    "speedup": self.best.speedup, "beats_plain": self.beats_plain},
            "warning": self.warning,
        }

    def table(self) -> str:
        """A plain-text table of the trials with a legend; the recommended one is marked
        ``*``; when no draft beats plain greedy decoding, the last line recommends none."""
        lines = [f"target: {self.baseline_tokens_per_s:.1f} tokens/s (plain greedy, {self.new_tokens} tokens "
                 f"after {self.prompts} prompts, {self.device}{', compiled' if self.compiled else ''})",
                 f"{'size':>6} {'reached':>8} {'k':>3} {'accept':>7} {'tok/step':>8} {'tok/s':>9} "
                 f"{'speedup':>8} {'same':>5}"]
        for t in self.trials:
            mark = "*" if t is self.best and self.beats_plain else " "
            lines.append(f"{t.size_requested:>6.2f} {t.size_reached:>8.3f} {t.k:>3d} {t.acceptance_rate:>7.3f} "
                         f"{t.tokens_per_step:>8.2f} {t.tokens_per_s:>9.1f} {t.speedup:>7.2f}x "
                         f"{'yes' if t.identical else 'NO':>5}{mark}")
        lines.append("size: requested fraction of the decoder, reached: kept; k: tokens drafted per target pass; "
                     "accept: drafted tokens accepted; tok/step: tokens per target pass; speedup: tok/s over plain "
                     "greedy decoding; same: output equal to plain greedy decoding token for token"
                     + ("; *: recommended (the fastest of those)" if self.beats_plain else ""))
        if self.beats_plain:
            lines.append(f"recommended: size {self.best.size_requested:g}, k {self.best.k} "
                         f"({self.best.speedup:.2f}x plain greedy decoding)")
        elif self.best is not None:
            lines.append(f"recommended: no draft, plain greedy decoding (the fastest draft, size "
                         f"{self.best.size_requested:g} with k {self.best.k}, runs at {self.best.speedup:.2f}x)")
        return "\n".join(lines)


def _draft_source(target: nn.Module, source, shared: bool) -> Callable[[float], tuple[nn.Module, float]]:
    """``size -> (draft, size reached)`` from a :class:`Target`, a fit, a ranking, a
    mapping of ready drafts or a function making them."""
    if isinstance(source, Mapping):
        if shared:
            raise ValueError("shared=True cuts drafts from a ranking; ready drafts are what they are")

        def from_mapping(size):
            if size not in source:
                raise ValueError(f"no draft of size {size} among {sorted(source)}")
            draft = source[size]
            return draft, _size_of(draft, size)
        return from_mapping
    if callable(source) and not isinstance(source, nn.Module):
        if shared:
            raise ValueError("shared=True cuts drafts from a ranking; a draft-making function makes its own")
        return lambda size: (lambda d: (d, _size_of(d, size)))(source(size))
    if isinstance(source, Target):
        if source.lm is not target:
            raise ValueError("choose_draft(target, source): the target must be source.lm")
        return lambda size: (lambda d: (d, _size_of(d, size)))(source.draft(size, shared=shared))
    ranking = source.ranking() if hasattr(source, "ranking") and callable(source.ranking) else source
    if not hasattr(ranking, "masks"):
        raise TypeError(f"pass a Target, a fitted network (PuppetFit), a Ranking or a mapping size -> draft LM, "
                        f"not {type(source).__name__}")

    adapters = getattr(source, "adapters", None)  # a PuppetFit with size adapters: each size its own weights
    if adapters is not None and shared:
        raise ValueError("shared=True cuts every draft from one target's weights; a fit with size adapters has "
                         "other weights at every size: use shared=False")

    def from_ranking(size):
        if shared:
            draft = shared_draft(target, ranking, size)
            return draft, _size_of(draft, size)
        from ..deploy.subnetwork import build_subnetwork

        masks = ranking.masks(size)
        if adapters is not None:  # the draft as the fit ships it: sliced from its size's merged LM
            return source.subnetwork_of(masks), masks.size_reached
        return build_subnetwork(target, masks), masks.size_reached
    return from_ranking


def _size_of(draft: nn.Module, default: float) -> float:
    reached = getattr(getattr(draft, "config", None), "ppn_size_reached", None)
    return float(reached) if reached is not None else float(default)


def _decoder_params(lm: nn.Module) -> int:
    from ..core.architecture import decoder_layers

    return sum(p.numel() for p in decoder_layers(lm).parameters())


@torch.no_grad()
def choose_draft(target: nn.Module, source, *, sizes: Sequence[float], ks: Sequence[int],
                 prompts: Sequence[torch.Tensor], max_new_tokens: int = 64, compile: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 warmup: bool = True, repeats: int = 1, shared: bool = False, pad_verify: bool | None = None,
                 on_trial: Callable[[DraftTrial], None] | None = None, progress: bool = False,
                 **decoder_options) -> DraftChoice:
    """Measure greedy speculative decoding of ``target`` for every draft size and draft
    length ``k``, on this machine, and recommend the fastest pair.

    Parameters
    ----------
    target
        The dense LM (moved to ``device``/``dtype`` in place when they are given).
    source
        Where drafts come from: a :class:`Target` (from :func:`load_target`; ``target``
        is then ``source.lm``), a :class:`~ppn_bayes.fit.PuppetFit` or a
        :class:`~ppn_bayes.core.ranking.Ranking` of ``target`` (each draft is then
        ``build_subnetwork(target, ranking.masks(size))``), a mapping ``size -> draft LM``
        or a function ``size -> draft LM`` (called once per size).
    sizes, ks
        Draft sizes (fractions of the decoder's parameters) and draft lengths to try.
    prompts
        Token tensors ``[T]`` or ``[1, T]``, one a prompt.
    max_new_tokens
        Tokens generated after each prompt.
    compile
        Compile the fixed-shape decode calls (``torch.compile``, CUDA graphs on a GPU).
    warmup
        Run every configuration once, untimed, before timing it (compiles it).
    repeats
        Timed runs of every prompt (their times add up).
    shared
        Cut drafts as views of a rank-sorted target (:func:`shared_draft`) instead of copies.
    pad_verify
        Pad every verification to ``max(ks) + 1`` tokens, so that one compiled target graph
        serves every ``k`` (default: when compiling).
    on_trial
        Called with each :class:`DraftTrial` as soon as it is measured (to write records
        incrementally).
    progress
        Show the sweep as a progress bar (tqdm, on stderr): the target's plain decoding,
        then one step per size and ``k``, each with its speed-up.

    Returns
    -------
    DraftChoice
        Every trial, the target's plain greedy speed (measured in the same run), and the
        recommended trial ``best``.
    """
    sizes = [float(s) for s in sizes]
    ks = [_check_k(k) for k in ks]
    if not sizes or not ks:
        raise ValueError("give at least one size and one k")
    prompts = [p[None] if p.dim() == 1 else p for p in prompts]
    if not prompts:
        raise ValueError("give at least one prompt")
    for p in prompts:
        if p.dim() != 2 or p.shape[0] != 1 or p.shape[1] < 1:
            raise ValueError(f"each prompt must be a non-empty [T] or [1, T] token tensor, got {tuple(p.shape)}")
    make_draft = _draft_source(target, source, shared)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    max_len = max(p.shape[1] for p in prompts) + max_new_tokens + max(ks) + 1
    verify_len = max(ks) + 1 if (compile if pad_verify is None else pad_verify) else None
    options = dict(compile=compile, **decoder_options)
    target_decoder = Decoder(target, max_len=max_len, device=device, dtype=dtype, **options)
    from tqdm.auto import tqdm

    with tqdm(total=1 + len(sizes) * len(ks), disable=not progress, desc="speculate", unit="run") as bar:
        bar.set_postfix_str("plain greedy decoding of the target")
        # Plain greedy decoding of the target: the baseline and the reference output.
        if warmup:
            target_decoder.generate(prompts[0], max_new_tokens)
        reference, baseline_seconds = [], 0.0
        for prompt in prompts:
            for _ in range(repeats):
                tokens, _, seconds = target_decoder._generate(prompt, max_new_tokens)
                baseline_seconds += seconds
            reference.append(tokens.cpu())
        total_tokens = max_new_tokens * len(prompts) * repeats
        baseline = total_tokens / baseline_seconds
        bar.update()

        trials = []
        for size in sizes:
            draft, reached = make_draft(size)
            check_draft(target, draft)
            draft_decoder = Decoder(draft, max_len=max_len, device=target_decoder.device, dtype=target_decoder.dtype,
                                    **options)
            if warmup:
                draft_decoder.generate(prompts[0], max_new_tokens)
            draft_seconds = sum(draft_decoder._generate(prompts[0], max_new_tokens)[2] for _ in range(repeats))
            draft_speed = max_new_tokens * repeats / draft_seconds
            for k in ks:
                if warmup:
                    speculative_generate(target_decoder, draft_decoder, prompts[0], max_new_tokens, k=k,
                                         verify_len=verify_len)
                histogram = [0] * (k + 1)
                seconds, identical = 0.0, True
                for prompt, expected in zip(prompts, reference):
                    for _ in range(repeats):
                        run = speculative_generate(target_decoder, draft_decoder, prompt, max_new_tokens, k=k,
                                                   verify_len=verify_len)
                        histogram = [a + b for a, b in zip(histogram, run.histogram)]
                        seconds += run.seconds
                        identical &= torch.equal(run.tokens, expected)
                summary = Speculation(tokens=torch.empty(1, total_tokens, dtype=torch.long), k=k,
                                      steps=sum(histogram), histogram=tuple(histogram), seconds=seconds)
                trial = DraftTrial(
                    size_requested=size, size_reached=reached, k=k, acceptance_rate=summary.acceptance_rate,
                    mean_accepted=summary.mean_accepted, tokens_per_step=summary.tokens_per_step,
                    tokens_per_s=summary.tokens_per_s, speedup=summary.tokens_per_s / baseline,
                    identical=bool(identical), steps=summary.steps, histogram=tuple(histogram),
                    new_tokens=total_tokens, seconds=seconds, draft_params=_decoder_params(draft),
                    draft_tokens_per_s=draft_speed,
                )
                trials.append(trial)
                bar.set_postfix_str(f"size {size:g} k {k}: {trial.speedup:.2f}x")
                bar.update()
                if on_trial is not None:
                    on_trial(trial)
            del draft_decoder, draft
    return DraftChoice(trials=tuple(trials), baseline_tokens_per_s=baseline, baseline_seconds=baseline_seconds,
                       new_tokens=total_tokens, prompts=len(prompts), device=str(target_decoder.device),
                       compiled=bool(compile))


# -- drafts that share the target's weights -------------------------------------------------------
def rank_sorted(lm: nn.Module, ranking) -> tuple[nn.Module, "Ranking"]:
    """``lm`` with each layer's attention units and MLP units sorted by ``ranking`` (a
    new module computing the same function), and the ranking in those sorted positions.

    In the sorted LM the units any size keeps are a prefix of every layer's tensors:
    what :func:`shared_draft` needs. A ranked checkpoint (:mod:`ppn_bayes.deploy.resize`) stores
    the same thing; ``resize(checkpoint, 1.0).lm`` and ``checkpoint.ranking`` load it.
    """
    from ..deploy.resize import ranked_ranking, rank_order
    from ..deploy.subnetwork import LMTensors, build_from_source

    order = rank_order(ranking)
    return build_from_source(LMTensors(lm), ranking.arch, order), ranked_ranking(ranking, order)


def shared_draft(ranked_target: nn.Module, ranking, size: float) -> nn.Module:
    """The sub-network of ``size`` whose weights are views of ``ranked_target``'s.

    ``ranked_target`` is an LM whose layers hold their units in rank order and
    ``ranking`` its ranking in those positions (:func:`rank_sorted`, or a ranked
    checkpoint's ``resize(checkpoint, 1.0).lm`` and ``checkpoint.ranking``). Each kept
    tensor is then a prefix: q/k/v and gate/up keep their first rows (``weight[:rows]``,
    contiguous), o and down their first columns (``weight[:, :cols]``, a strided view
    that matrix multiplication reads in place); embeddings, norms and the LM head are the
    target's own tensors. A tensor that is not a prefix (GPT-2's fused q/k/v when some
    attention units are dropped) is copied. :func:`new_parameter_bytes` measures what the
    draft added. It is the one sub-network builder
    (:func:`~ppn_bayes.deploy.subnetwork.build_from_source`) reading
    :class:`~ppn_bayes.deploy.subnetwork.SharedTensors`.

    The draft must not be trained or modified in place: its weights are the target's.
    """
    from ..core.budget import Budget
    from ..deploy.resize import check_prefixes
    from ..deploy.subnetwork import SharedTensors, build_from_source, selection_from_masks

    Budget(size=size)  # checked before any work
    check_prefixes(ranking)
    masks = ranking.masks(size)
    draft = build_from_source(SharedTensors(ranked_target), ranking.arch, selection_from_masks(masks))
    draft.config.ppn_size_reached = masks.size_reached
    return draft


def _storages(module: nn.Module, *, buffers: bool) -> dict[int, int]:
    found = {}
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    for tensor in tensors:
        storage = tensor.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    return found


def new_parameter_bytes(draft: nn.Module, target: nn.Module, *, buffers: bool = False) -> int:
    """Bytes of storage the draft's parameters (and buffers, if asked) hold that are not
    the target's: 0 for a draft made only of views."""
    ours = _storages(target, buffers=True)
    return sum(nbytes for pointer, nbytes in _storages(draft, buffers=buffers).items() if pointer not in ours)


# -- loading a target and its ranking ------------------------------------------------------------
@dataclass
class Target(RankedLM):
    """A target LM with the ranking its drafts are cut by, and its tokenizer (if any).

    ``ranked`` says the LM's units are stored in rank order (a ranked checkpoint), so
    :func:`shared_draft` can cut drafts as views.
    """

    def draft(self, size: float, *, shared: bool = False) -> nn.Module:
        """The draft of ``size``: views of the target (``shared``, ranked targets only) or a copy."""
        if shared:
            if not self.ranked:
                raise ValueError("shared drafts need a rank-sorted target: open a ranked checkpoint "
                                 "(`ppn-bayes export-ranked`) or use rank_sorted()")
            return shared_draft(self.lm, self.ranking, size)
        from ..deploy.subnetwork import build_subnetwork

        masks = self.ranking.masks(size)
        draft = build_subnetwork(self.lm, masks)
        draft.config.ppn_size_reached = masks.size_reached
        return draft


def load_target(path, *, masks_file=None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, rank: bool = False) -> Target:
    """Open a target and the ranking its drafts come from.

    ``path`` is anything :func:`~ppn_bayes.deploy.artifacts.open_ranked_lm` opens: a
    ranked checkpoint (the full LM read in rank order, no pyro needed), a fit checkpoint
    (the fitted LM and its ranking), or a Hugging Face directory or ``.gguf`` file with
    ``masks_file`` (a mask file of that LM, whose ranking is used). With ``rank``, a
    target that is not rank-sorted is sorted in memory (:func:`rank_sorted`) so that
    shared drafts can be cut from it.
    """
    opened = open_ranked_lm(path, masks_file=masks_file, device=device, dtype=dtype)
    if rank and not opened.ranked:
        lm, ranking = rank_sorted(opened.lm, opened.ranking)
        return Target(lm, ranking, opened.tokenizer, opened.kind, ranked=True)
    return Target(opened.lm, opened.ranking, opened.tokenizer, opened.kind, ranked=opened.ranked)


def prompts_from_tokens(tokens: torch.Tensor, *, n_prompts: int, prompt_len: int) -> list[torch.Tensor]:
    """``n_prompts`` prompts ``[prompt_len]`` cut from ``tokens [N]`` at evenly spaced starts."""
    if n_prompts < 1 or prompt_len < 1:
        raise ValueError("n_prompts and prompt_len must be at least 1")
    if tokens.numel() < prompt_len:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one prompt of {prompt_len}")
    last = tokens.numel() - prompt_len
    starts = [round(i * last / max(n_prompts - 1, 1)) for i in range(n_prompts)]
    return [tokens[s:s + prompt_len].clone() for s in starts]
