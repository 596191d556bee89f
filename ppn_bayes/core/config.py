"""Settings of a fit: one frozen dataclass, validated when built, saved with every result."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Sequence

from .schedule import check_schedule

__all__ = ["FitConfig", "check_anchors", "check_compiler", "check_fields", "setting", "CONCERNS", "FIT_HELP",
           "NOT_IDENTIFYING", "RECIPES", "RECIPE_SPANS", "recipe_settings"]

#: The concerns a fit's settings fall into, in ``--help`` order: ``prior`` (the Bayesian
#: model and its guide: units, hierarchy, the prior's weight, the guide's start),
#: ``objective`` (the likelihood each step: the sizes trained, the gates' relaxation, the
#: NLL and distillation terms), ``optimisation`` (how the parameters move: steps, batches,
#: rates, schedule) and ``run`` (seeding, checkpoints, evaluation, devices and precision).
CONCERNS = ("prior", "objective", "optimisation", "run")
PRIOR, OBJECTIVE, OPTIMISATION, RUN = CONCERNS


def setting(default, concern: str, help: str, *, identifies: bool = True, **metadata):
    """A settings field: its ``default``, its ``concern`` (one of :data:`CONCERNS` for a
    :class:`FitConfig`, free for other settings classes), its one-line ``help`` (the CLI's
    text) and whether it ``identifies`` a fit (``False``: it does not change what a fit
    computes, only when it saves, logs or evaluates, or how the work is spread). Any further
    ``metadata`` (e.g. ``bound="positive"``, ``choices=...``) goes to the CLI's flag."""
    return dataclasses.field(default=default, metadata={"concern": concern, "help": help,
                                                         "identifies": identifies, **metadata})


#: How the gates of one training draw depend on each other (``FitConfig.gate_coupling``).
COUPLINGS = ("independent", "shared", "prefix")
#: What the gated LM is distilled towards (``FitConfig.teacher``).
TEACHERS = ("self", "original")
#: Mixed precision of a fit's forward passes (``FitConfig.autocast``).
AUTOCASTS = ("none", "bfloat16", "float16")
#: ``torch.compile`` backends for the gated LM's forward (``FitConfig.compile``; ``none``: eager).
COMPILERS = ("none", "inductor", "aot_eager", "eager")


def check_compiler(backend: str) -> str:
    """``backend``, or ``ValueError`` naming the known :data:`COMPILERS` (a fit's and a
    fine-tune's ``compile`` setting alike)."""
    if backend not in COMPILERS:
        raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILERS))}, got {backend!r}")
    return backend


def check_anchors(anchors: Sequence[float]) -> tuple[float, ...]:
    """``anchors`` as a tuple, or ``ValueError`` naming what is wrong: none given, one outside
    ``(0, 1]``, or not strictly increasing."""
    anchors = tuple(anchors)
    if not anchors:
        raise ValueError("size_anchors must hold at least one size")
    for a in anchors:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0 < a <= 1:
            raise ValueError(f"size_anchors must lie in (0, 1], got {a!r} in {anchors}")
    if any(b <= a for a, b in zip(anchors, anchors[1:])):
        raise ValueError(f"size_anchors must be sorted and strictly increasing, got {anchors}")
    return anchors


#: How the guide's unit locations start (``FitConfig.init``).
INITS = ("neutral", "activation")


@dataclass(frozen=True)
class FitConfig:
    """How a push puppet network is fitted.

    Sizes: every step trains the full LM (unless ``train_full_lm`` is off), the smallest
    size ``size_min``, the named ``train_sizes`` and ``n_random_sizes`` sizes drawn from
    ``[size_min, size_max]`` (uniformly, or more often small with ``size_power`` above 1; the
    sandwich rule), each on its share of the batch's rows, in one pass. Weighting: each row's loss is
    ``nll_weight`` · its next-token NLL + ``distill_weight`` · KL(teacher ‖ LM), per token;
    each size weighs alike; the prior KL is scaled by ``prior_weight / prior_tokens``
    (``prior_tokens`` defaults to the number of training tokens, which makes the loss the
    ELBO per token).

    Every field is a :func:`setting`: its metadata holds its help text (the CLI's), its
    concern (:data:`CONCERNS`; :meth:`concern` returns one concern's settings, and
    ``ppn-bayes fit --help`` groups the flags by concern) and whether it identifies a fit.
    Those that do not (:data:`NOT_IDENTIFYING`: when to checkpoint, log and evaluate, how the
    work is spread and compiled) may change on a resume, and the benchmark report counts runs
    that differ only in them as repeats of one fit.
    """

    steps: int = setting(200, OPTIMISATION,
            "training steps")
    batch_size: int = setting(8, OPTIMISATION,
            "sequences per step (per process under torchrun), or per micro-batch with accumulate")
    accumulate: int = setting(1, OPTIMISATION,
            "micro-batches per step: each process runs batch_size sequences this many times before the optimizer "
            "steps (global batch = batch_size x accumulate x processes; the same sizes and gate draws in every "
            "micro-batch, so the result equals one batch of that size, in less memory)")
    seq_len: int = setting(128, OPTIMISATION,
            "tokens per training sequence")
    lr_lm: float = setting(3e-5, OPTIMISATION,
            "AdamW learning rate of the LM's weights")
    lr_guide: float = setting(0.05, OPTIMISATION,
            "AdamW learning rate of the guide's parameters (loc and log-scale of log λ)")
    weight_decay: float = setting(0.0, OPTIMISATION,
            "AdamW weight decay of the LM's weights")
    adam_beta2: float = setting(0.999, OPTIMISATION,
            "AdamW's beta2 for the LM's weights (the decay of its average of squared gradients; PyTorch's "
            "0.999 by default, 0.95 in many distillation and pre-training recipes)", bound="decay")
    size_min: float = setting(0.3, OBJECTIVE,
            "smallest size trained each step (sandwich rule)")
    size_max: float = setting(1.0, OBJECTIVE,
            "largest size drawn for the random sizes")
    n_random_sizes: int = setting(1, OBJECTIVE,
            "random sizes in [size_min, size_max] trained each step")
    size_power: float = setting(1.0, OBJECTIVE,
            "the random sizes are size_min + (size_max - size_min) * u ** size_power with u uniform on [0, 1): 1 "
            "draws them uniformly, above 1 draws the small sizes (the hard ones) more often")
    train_sizes: tuple[float, ...] = setting((), OBJECTIVE,
            "sizes trained every step besides size_min and the random ones, each on its share of the rows (the "
            "sizes you mean to ship: each gets a fixed share of the text, as size_min does; the other sizes still "
            "come from the same ranking, trained through the random draws; default: none)")
    train_full_lm: bool = setting(True, OBJECTIVE,
            "give the full LM (every gate on) its share of each step's rows, the top of the sandwich rule; "
            "--no-train-full-lm gives every row to a gated size (with teacher='original' the full LM, which no "
            "one deploys, then only moves with the sub-networks it holds)")
    size_rank: int = setting(0, OBJECTIVE,
            "rank r of the size adapters: every decoder layer's attention and MLP output projections get, per "
            "anchor size, a low-rank correction B A of this rank, interpolated in the size between the "
            "size_anchors, trained with the LM's weights and merged exactly into the weights of each exported "
            "size (0: no adapters, the fit as before)", bound="nonnegative")
    size_anchors: tuple[float, ...] = setting((0.3, 0.5, 0.7, 0.9, 1.0), OBJECTIVE,
            "with size_rank: the anchor sizes of the size adapters (sorted, strictly increasing, each in (0, 1]); "
            "a size between two anchors reads both corrections, linearly interpolated, one outside them the "
            "nearest end anchor's")
    temperature: float = setting(0.5, OBJECTIVE,
            "temperature of the relaxed Bernoulli gates (straight-through)")
    gate_coupling: str = setting("independent", OBJECTIVE,
            "'independent' (every gate its own draw) or 'shared' (one noise draw for all gates: comonotone gates, "
            "so every training mask is a prefix of a ranking, like the deployed masks) or 'prefix' (every "
            "training mask the longest prefix of the draw's ranking that fits the size: deployed-style masks of "
            "the requested size)")
    distill_weight: float = setting(1.0, OBJECTIVE,
            "weight of KL(teacher || LM) per token in every row's loss (the full LM's and the sub-networks'); 0 "
            "turns the distillation off")
    nll_weight: float = setting(1.0, OBJECTIVE,
            "weight of the next-token NLL per token in every row's loss; 0 trains on the distillation term alone")
    teacher: str = setting("self", OBJECTIVE,
            "'self' (the distillation teacher is the full LM, all gates on, as it trains) or 'original' (a frozen "
            "copy of the LM the fit started from; the full LM then trains towards it too, so that the LM does not "
            "drift to the training text)")
    prior_weight: float = setting(1.0, PRIOR,
            "weight of the prior KL against the per-token likelihood")
    prior_tokens: int | None = setting(None, PRIOR,
            "tokens the prior KL is spread over (default: the training text's length)")
    posterior: str = setting("normal", PRIOR,
            "'normal' (mean-field normal on log λ) or 'point' (point estimates; ablation)")
    hierarchy: bool = setting(True, PRIOR,
            "layer gates above unit gates; --no-hierarchy fits flat units (ablation)")
    train_lm: bool = setting(True, OPTIMISATION,
            "train the LM's weights with the gates; --no-train-lm freezes the LM (ablation)")
    layer_init: float = setting(1.0, PRIOR,
            "initial posterior location of every log λ_l (above 0: layers start safer than units)")
    init_scale: float = setting(0.1, PRIOR,
            "initial posterior scale of every log λ")
    init_jitter: float = setting(0.0, PRIOR,
            "standard deviation of a seeded random spread of the initial unit locations log λ_lu")
    freeze_lm_steps: int = setting(0, OPTIMISATION,
            "the LM's weights stay fixed for this many first steps (the gates settle first)")
    hold_steps: int = setting(0, OPTIMISATION,
            "the first this many steps hold the guide at its start and train the LM alone on the start's deployed "
            "masks (the prefixes of the starting ranking at each drawn size), so the LM has learnt to work cut "
            "before the posterior moves the structure (0: the guide learns from the first step)")
    settle_steps: int = setting(0, OPTIMISATION,
            "the last this many steps freeze the guide and train the LM on the deployed masks alone (the prefixes "
            "of the posterior's median ranking at each drawn size), so the sub-networks that ship are the ones the "
            "LM last learnt (0: every step samples the gates from the guide)")
    average_steps: int = setting(0, OPTIMISATION,
            "with settle_steps: the guide's parameters are averaged over this many steps before the fit settles, "
            "and the guide takes that average when it settles (Polyak averaging), so the ranking that settles is the "
            "centre of the guide's last steps rather than where their noise left it (0: the guide as it stands)")
    mlp_group: int = setting(64, PRIOR,
            "intermediate channels per MLP unit (g)")
    grad_clip: float = setting(1.0, OPTIMISATION,
            "clip the gradient norm to this; 0 turns clipping off")
    seed: int = setting(0, RUN,
            "seed of data order, sizes and gate draws")
    checkpoint_every: int = setting(0, RUN,
            "write a checkpoint every this many steps (0: only at the end)", identifies=False)
    log_every: int = setting(10, RUN,
            "record the loss every this many steps", identifies=False)
    eval_every: int = setting(0, RUN,
            "with held-out text (fit --eval-data): its NLL every this many steps and at the end (0: at the end "
            "only), for the full LM and the sub-network at size_min", identifies=False)
    eval_windows: int = setting(16, RUN,
            "held-out windows of seq_len tokens per evaluation", identifies=False)
    eval_sizes: tuple[float, ...] = setting((), RUN,
            "sizes whose deployed masks (the longest prefix of the posterior's median ranking) are evaluated on "
            "the held-out text at every evaluation, with the ranking's stability and the share of ambiguous units "
            "at each (default: size_min)", identifies=False)
    lr_schedule: str = setting("constant", OPTIMISATION,
            "'constant' or 'cosine' (after the warm-up, a half cosine from the base rates down to a tenth of them "
            "at the last step), for the LM's and the guide's rates alike")
    warmup_steps: int = setting(0, OPTIMISATION,
            "the rates rise linearly over this many first steps (0: no warm-up)")
    init: str = setting("neutral", PRIOR,
            "'neutral' (every unit location log λ_lu starts at 0) or 'activation' (each layer's MLP channels are "
            "put in order of their mean |activation| on the first training windows, which leaves the LM's "
            "function unchanged, and the unit locations start spread by their rank within their layer and kind, "
            "so the first masks are close to the uniform activation cut)")
    parallel: str = setting("auto", RUN,
            "under torchrun: 'auto' (DDP when there are several processes), 'ddp' (every process holds the whole "
            "LM), 'fsdp' (FSDP2: every process holds a shard of each layer) or 'none'", identifies=False)
    autocast: str = setting("none", RUN,
            "mixed precision of the forward passes: 'none', 'bfloat16' or 'float16' (GPU)")
    compile: str = setting("none", RUN,
            "torch.compile backend of the gated LM's forward ('inductor' on a GPU; 'aot_eager' or 'eager' to "
            "check the graph; 'none': eager): one graph serves every step and size", identifies=False)

    def __post_init__(self):
        check_fields(self)
        positive = ("steps", "batch_size", "accumulate", "lr_guide", "temperature", "mlp_group", "log_every",
                    "eval_windows", "init_scale", "size_power")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0 < self.size_min <= self.size_max <= 1:
            raise ValueError(
                f"sizes must satisfy 0 < size_min <= size_max <= 1, got {self.size_min}, {self.size_max}"
            )
        for name in ("lr_lm", "weight_decay", "distill_weight", "nll_weight", "prior_weight", "checkpoint_every",
                     "n_random_sizes", "grad_clip", "init_jitter", "freeze_lm_steps", "eval_every",
                     "warmup_steps", "hold_steps", "settle_steps", "average_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.average_steps and not self.settle_steps:
            raise ValueError("average_steps averages the guide for the fit's settling steps; it needs settle_steps > 0")
        spans = {name: getattr(self, name) for name in ("hold_steps", "average_steps", "settle_steps")
                 if getattr(self, name)}  # the stretches of steps the fit sets apart, in their order
        if sum(spans.values()) > self.steps:
            raise ValueError(f"{' + '.join(spans)} ({' + '.join(map(str, spans.values()))}) must not exceed steps "
                             f"({self.steps})")
        for name in ("hold_steps", "settle_steps"):
            if getattr(self, name) and not self.train_lm:
                raise ValueError(f"{name} trains the LM alone on fixed masks; with train_lm off it would train "
                                 "nothing")
        if self.hold_steps and self.freeze_lm_steps:
            raise ValueError("hold_steps (the guide waits) and freeze_lm_steps (the LM waits) are exclusive: "
                             "together nothing would train in the first steps")
        if not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        if self.posterior not in ("normal", "point"):
            raise ValueError(f"posterior must be 'normal' or 'point', got {self.posterior!r}")
        if self.gate_coupling not in COUPLINGS:
            raise ValueError(f"gate_coupling must be one of {', '.join(map(repr, COUPLINGS))}, "
                             f"got {self.gate_coupling!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(map(repr, TEACHERS))}, got {self.teacher!r}")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be 'auto', 'none', 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {', '.join(map(repr, AUTOCASTS))}, got {self.autocast!r}")
        check_compiler(self.compile)
        check_schedule(self.lr_schedule)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}")
        _check_sizes("train_sizes", self.train_sizes, self.size_min,
                     f"(size_min, 1] = ({self.size_min:g}, 1] (size_min is trained every step already)")
        _check_sizes("eval_sizes", self.eval_sizes)
        if self.size_rank < 0:
            raise ValueError(f"size_rank must not be negative, got {self.size_rank}")
        check_anchors(self.size_anchors)
        if self.size_rank and not self.train_lm:
            raise ValueError("size_rank > 0: the size adapters train with the LM's weights; with train_lm off "
                             "they would stay zero")
        if self.distill_weight == 0 and self.nll_weight == 0:
            raise ValueError("nll_weight and distill_weight are both 0: the likelihood would be empty")
        if self.prior_tokens is not None and self.prior_tokens < 1:
            raise ValueError(f"prior_tokens must be positive, got {self.prior_tokens}")

    @property
    def full_lm_rows(self) -> bool:
        """Whether a step gives the full LM (every gate on) rows of its own: while the LM trains
        and ``train_full_lm`` is on."""
        return self.train_lm and self.train_full_lm

    @property
    def trained_range(self) -> tuple[float, float]:
        """The smallest and the largest size a fit with these settings trains: ``size_min``, and
        the largest of the ``train_sizes``, ``size_max`` (where random sizes are drawn) and 1
        (where the full LM has rows of its own)."""
        tops = [self.size_min, *self.train_sizes]
        if self.n_random_sizes:
            tops.append(self.size_max)
        if self.full_lm_rows:
            tops.append(1.0)
        return self.size_min, max(tops)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FitConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fit settings {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})  # JSON lists

    def replace(self, **changes) -> "FitConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def recipe(cls, name: str, **changes) -> "FitConfig":
        """The settings of the named recipe over the defaults, then ``changes``: the recipe's
        steps set apart (warm-up, settling, averaging; :data:`RECIPE_SPANS`) are scaled to
        ``changes``' ``steps`` (else the default's), so give ``steps`` here rather than to
        :meth:`replace` afterwards."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        steps, train_lm = (changes.get(k, defaults[k]) for k in ("steps", "train_lm"))
        return cls(**{**recipe_settings(name, steps, train_lm=train_lm), **changes})

    def concern(self, name: str) -> dict:
        """The settings of concern ``name`` (one of :data:`CONCERNS`), as ``{field: value}``."""
        if name not in CONCERNS:
            raise ValueError(f"concern must be one of {', '.join(map(repr, CONCERNS))}, got {name!r}")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["concern"] == name}


def _check_sizes(name: str, sizes: tuple[float, ...], low: float = 0.0, interval: str = "(0, 1]") -> None:
    """Raise ``ValueError`` unless every one of ``sizes`` lies in ``(low, 1]`` (named ``interval``
    in the message) and none is given twice."""
    for size in sizes:
        if not low < size <= 1:
            raise ValueError(f"{name} must lie in {interval}, got {size}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{name} has a size twice: {sizes}")


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The plain types each field of dataclass ``cls`` admits (``int | None`` gives
    ``(Integral, NoneType)``; a float field admits any real number, ints too)."""
    admitted = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        numeric = {int: numbers.Integral, float: numbers.Real}
        admitted[name] = tuple(numeric.get(a, typing.get_origin(a) or a) for a in args)
    return admitted


def check_fields(settings) -> None:
    """Raise ``ValueError`` naming the first field of the dataclass instance ``settings``
    whose value is not of its declared type (a bool is no number) or is a number that is
    NaN or infinite (also inside tuples). Every settings class calls it first in
    ``__post_init__``, so that the range checks after it see finite numbers only."""
    admitted = _field_types(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        kinds = admitted.get(f.name, (object,))
        if typing.Any in kinds:
            continue
        if isinstance(value, bool) and bool not in kinds and object not in kinds:
            raise ValueError(f"{f.name} must be a number, got {value!r}")
        if not isinstance(value, kinds):
            names = " or ".join(sorted({getattr(k, "__name__", str(k)) for k in kinds}))
            raise ValueError(f"{f.name} must be {names}, got {value!r}")
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{f.name} must be a finite number, got {item}")


#: One line of documentation per :class:`FitConfig` field (its ``help`` metadata).
FIT_HELP: dict[str, str] = {f.name: f.metadata["help"] for f in dataclasses.fields(FitConfig)}

#: The :class:`FitConfig` fields that do not change what a fit computes (``identifies=False``
#: in their metadata): two fits that differ only in these are the same fit.
NOT_IDENTIFYING: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(FitConfig)
                                         if not f.metadata["identifies"])

#: Named recipes: the :class:`FitConfig` settings each one sets over the defaults
#: (:meth:`FitConfig.recipe`, ``ppn-bayes fit --recipe NAME``). ``default``: the defaults.
#: ``record``: the fit of record of issue 15 (docs/method.md, "The fit of record"): every
#: size taught by a frozen copy of the original LM through the full-logit KL alone,
#: deployed-style (prefix) training masks, units started from their activation ranks, a half
#: cosine of the rates, the LM's weights at 1e-3 with AdamW's beta2 0.95, and every row of a
#: batch a gated size: ``size_min`` 0.3 and three sizes drawn uniformly from [0.3, 1]; its
#: steps set apart (:data:`RECIPE_SPANS`) scale with the fit's length. Until 5 December 2026
#: the record drew its sizes more often small (``size_power`` 2) and settled for 300 steps.
RECIPES: dict[str, types.MappingProxyType] = {
    "default": types.MappingProxyType({}),
    "record": types.MappingProxyType(dict(
        teacher="original", nll_weight=0.0, gate_coupling="prefix", init="activation", lr_schedule="cosine",
        lr_lm=1e-3, adam_beta2=0.95, size_min=0.3, n_random_sizes=3, size_power=1.0, train_full_lm=False)),
}

#: The stretches of steps a recipe sets apart, as ``(steps of the recipe's own fit, {setting:
#: steps})``: :func:`recipe_settings` scales them to a fit's own number of steps (rounded). The
#: record warmed up for 100 of its 3,052 steps and fixed its masks for the last 1,500
#: (``settle_steps``), from the guide averaged over the 300 steps before (``average_steps``).
RECIPE_SPANS: dict[str, tuple[int, types.MappingProxyType]] = {
    "record": (3052, types.MappingProxyType(dict(warmup_steps=100, settle_steps=1500, average_steps=300))),
}


def recipe_settings(name: str, steps: int, *, train_lm: bool = True) -> dict:
    """The settings recipe ``name`` sets for a fit of ``steps`` steps: :data:`RECIPES`' own and
    :data:`RECIPE_SPANS`' scaled to ``steps``. With ``train_lm`` off the settling steps (which
    train the LM alone) are left out."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    settings = dict(RECIPES[name])
    length, spans = RECIPE_SPANS.get(name, (1, {}))
    settings.update({k: round(v * steps / length) for k, v in spans.items()
                     if train_lm or k not in ("settle_steps", "average_steps")})
    return settings
