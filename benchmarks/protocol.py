"""The benchmarks' protocol in one place: every method (its id, its human label, what builds it
and how), the sizes, and the targets of BENCHMARKS.md.

``quality.py`` runs the methods, ``report.py`` labels and orders them and checks the
targets, ``speed.py``, ``resize.py``, ``speculative.py`` and ``fit_recipes.py`` take their
default sizes from here; none of them keeps a list of its own (``tests/test_protocol.py``
checks that). The order of :data:`METHODS` is the order of the report's tables. The GPU
job's parts, which name the methods each step runs, are data too: ``jobs.py``.

A method is built by one of quality.py's runners (:data:`BUILDERS`), from the fit of record
(``quality.DEFAULT_FIT``) changed by its ``fit`` settings where it is a fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# -- sizes and targets -----------------------------------------------------------------------------------
#: Fractions of decoder parameters every method is measured at (quality.py, speed.py, resize.py).
PROTOCOL_SIZES = (0.9, 0.7, 0.5, 0.4, 0.3)
#: Sizes of the quality targets: ppn_bayes below every rival of :data:`TARGET_RIVALS` there.
TARGET_SIZES = (0.5, 0.4, 0.3)
TARGET_RIVALS = ("sparsegpt", "wanda")
#: ppn_bayes at :data:`DENSE_TARGET_SIZE` within :data:`DENSE_MARGIN` times the dense perplexity.
DENSE_TARGET_SIZE = 0.5
DENSE_MARGIN = 1.3
#: Speed target: a sub-network of size s at least SPEED_TARGET / s times as fast as the dense LM.
SPEED_TARGET = 0.9
#: Sizes where ppn_bayes is held against width-kd trained on as many tokens (and the sizes
#: width-kd runs at by default), and the perplexity ratio allowed.
WIDTH_KD_SIZES = (0.5, 0.3)
WIDTH_KD_MARGIN = 1.1
#: The same comparison at the ablations' smaller budget (the report's table, not the targets):
#: the fit of record's shorter variant and width-kd's.
SHORT_PEERS = ("ppn_bayes-short", "width-kd-short")
#: Sizes of the +distill fine-tunes by default.
FINETUNE_SIZES = (0.5,)
#: The one size of the N:M (2:4) sparse baselines.
N_M_SIZE = 0.5
#: A ``+distill-long`` fine-tune trains this many times the fit's tokens.
LONG_FINETUNE = 4
#: Draft sizes of the speculative-decoding benchmark, and those of its smoke run.
SPECULATIVE_SIZES = (0.3, 0.4, 0.5, 0.6, 0.7)
SPECULATIVE_QUICK_SIZES = (0.3, 0.5, 0.7)
#: Sizes the recipe search (fit_recipes.py) compares its short fits at.
RECIPE_SIZES = (0.5, 0.3)
#: The sizes benchmarks/settle.py compares (those the fit of record's diagnostics follow).
SETTLE_SIZES = (0.9, 0.5, 0.3)


# -- methods ------------------------------------------------------------------------------------------------
#: What a family of methods is, for the reader of the registry.
FAMILIES = MappingProxyType({
    "dense": "the LM itself, the reference",
    "fit of record": "one ppn_bayes fit with quality.DEFAULT_FIT, ranked, sliced at every size",
    "ablation": "the fit of record with one part of the method taken out",
    "variant": "the fit of record under other settings or another budget, recorded apart",
    "structured": "structured baselines ranked without training",
    "+distill": "a sub-network of a baseline or a fit, fine-tuned by self-distillation at the chosen size",
    "width": "the uniform width cut (every layer kept), with and without distillation",
    "sparse": "unstructured and N:M sparse baselines, run as dense matrices with zeros",
})
#: What builds a method: a runner of quality.py (``quality.RUNNERS``), or speed.py alone.
BUILDERS = MappingProxyType({
    "dense LM": "quality.py: the LM evaluated as it is",
    "fit": "quality.py: a ppn_bayes fit (its checkpoint reused when finished), ranked, sliced",
    "ranking": "quality.py: a ranking from scores without training (ShortGPT, magnitude, activation), sliced",
    "ranking+distill": "quality.py: the sub-network of the base's ranking, fine-tuned "
                       "(ppn_bayes.deploy.finetune.distill)",
    "fit+distill": "quality.py: the sub-network of the base's fit (fitted first when not done), fine-tuned",
    "width cut": "quality.py: the uniform width cut, no training",
    "width cut, distilled": "quality.py: the uniform width cut, distilled from the dense LM, one run per size",
    "one-shot pruning": "quality.py: llm-compressor one-shot pruning (SparseGPT, Wanda), unstructured or 2:4",
    "zeros": "speed.py --sparse-zeros: every decoder Linear's smallest weights zeroed, timed",
})
#: How a method reads quality.py's ``--fit-tokens``.
FIT_TOKENS = MappingProxyType({
    "no": "does not read it",
    "optional": "mixes it half and half with the training text when it is given",
    "mixed": "needs it, mixed half and half with the training text",
    "alone": "needs it, and fits on it alone",
})


@dataclass(frozen=True)
class Method:
    """One benchmark method.

    ``fit`` holds the FitConfig changes from the fit of record (ablations, variants; the
    +distill methods fine-tune the fit of ``base``); ``default`` puts the method in
    quality.py's default ``--methods``."""

    id: str
    label: str
    family: str
    builder: str
    fit: Mapping = field(default_factory=dict)
    fit_tokens: str = "no"
    base: str | None = None
    finetune_repeat: int = 1
    default: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.id}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.builder not in BUILDERS:
            raise ValueError(f"{self.id}: builder {self.builder!r} is not one of {', '.join(BUILDERS)}")
        if self.fit_tokens not in FIT_TOKENS:
            raise ValueError(f"{self.id}: fit_tokens {self.fit_tokens!r} is not one of {', '.join(FIT_TOKENS)}")
        if (self.base is not None) != self.builder.endswith("+distill"):
            raise ValueError(f"{self.id}: a base is what a +distill method fine-tunes, and only it has one")
        object.__setattr__(self, "fit", MappingProxyType(dict(self.fit)))

    @property
    def quality(self) -> bool:
        """Whether quality.py runs it (speed.py alone builds the ``zeros`` models)."""
        return self.builder != "zeros"

    @property
    def needs_fit_tokens(self) -> bool:
        return self.fit_tokens in ("mixed", "alone")

    @property
    def mixes_fit_tokens(self) -> bool:
        return self.fit_tokens in ("optional", "mixed")


_LONGER = f"{LONG_FINETUNE} x longer self-distillation"
#: A method's fit change that reads the fit's number of steps, whatever it is (:func:`fit_changes`).
ALL_STEPS = "steps"
_PREFIX = dict(gate_coupling="prefix")
_KD = dict(teacher="original", nll_weight=0.0)

#: Every method, in the order of the report's tables.
REGISTRY = (
    Method("dense", "dense", "dense", "dense LM", default=True),
    Method("ppn_bayes", "ppn_bayes", "fit of record", "fit", fit_tokens="optional", default=True),
    Method("ppn_bayes-flat", "ppn_bayes, flat units (no hierarchy)", "ablation", "fit",
           fit=dict(hierarchy=False), fit_tokens="optional", default=True),
    Method("ppn_bayes-point", "ppn_bayes, point estimates (no prior)", "ablation", "fit",
           fit=dict(posterior="point", prior_weight=0.0), fit_tokens="optional", default=True),
    Method("ppn_bayes-frozen", "ppn_bayes, frozen LM (gates only)", "ablation", "fit",
           fit=dict(train_lm=False), fit_tokens="optional", default=True),
    # no posterior learning: the LM trained on the start's nested masks (the activation ranking,
    # close to the uniform width cut) for every step, on the fit's rows: what the learnt
    # structure adds over its start
    Method("ppn_bayes-start", "ppn_bayes, the start's masks held throughout (no structure learnt)", "ablation", "fit",
           fit=dict(hold_steps=ALL_STEPS, settle_steps=0, average_steps=0), fit_tokens="optional"),
    # one size: every row of every step trains size 0.5 (no size_min of 0.3, no random sizes), with
    # the fit's path, rows, text and learnt structure: width-kd's peer at 0.5 (the uniform cut
    # trained for that size alone), which says what the other sizes' rows, sharing the LM's
    # weights, cost 0.5 in the one fit
    Method("ppn_bayes-alone", "ppn_bayes, every row at size 0.5 (one size trained)", "ablation", "fit",
           fit=dict(size_min=0.5, n_random_sizes=0), fit_tokens="optional"),
    # the next-token loss alone (set: the fit of record trains by distillation alone, nll_weight=0)
    Method("ppn_bayes-nodistill", "ppn_bayes, no self-distillation", "ablation", "fit",
           fit=dict(distill_weight=0.0, nll_weight=1.0), fit_tokens="optional", default=True),
    # variants: the fit of record under another budget (--fit-steps) or other settings
    Method("ppn_bayes-long", "ppn_bayes, a longer fit (same settings, more steps)", "variant", "fit"),
    # the ablations' reference when they run at a smaller budget than the fit of record (which
    # the targets judge): the same settings and text, fewer steps
    Method("ppn_bayes-short", "ppn_bayes, a shorter fit (same settings, fewer steps)", "variant", "fit",
           fit_tokens="optional"),
    Method("ppn_bayes-prefix", "ppn_bayes, prefix gates (training masks of the size asked)", "variant", "fit",
           fit=_PREFIX),
    Method("ppn_bayes-prefix-frozen", "ppn_bayes, prefix gates, frozen LM", "variant", "fit",
           fit=dict(_PREFIX, train_lm=False)),
    Method("ppn_bayes-prefix-lr", "ppn_bayes, prefix gates, lr_lm 1e-4", "variant", "fit",
           fit=dict(_PREFIX, lr_lm=1e-4)),
    Method("ppn_bayes-teacher", "ppn_bayes, fitted on teacher text", "variant", "fit", fit_tokens="alone"),
    Method("ppn_bayes-original", "ppn_bayes, the frozen original LM as teacher", "variant", "fit",
           fit=dict(teacher="original")),
    Method("ppn_bayes-original-long", "ppn_bayes, the frozen original LM as teacher, a longer fit", "variant",
           "fit", fit=dict(teacher="original")),
    Method("ppn_bayes-kd", "ppn_bayes, distillation only (frozen original teacher, no next-token loss)",
           "variant", "fit", fit=_KD),
    Method("ppn_bayes-kd-prefix", "ppn_bayes, distillation only, prefix gates", "variant", "fit",
           fit=dict(_KD, **_PREFIX)),
    Method("ppn_bayes-kd-prefix-mix", "ppn_bayes, distillation only, prefix gates, half teacher text", "variant",
           "fit", fit=dict(_KD, **_PREFIX), fit_tokens="mixed"),
    # structured baselines, no training
    Method("shortgpt", "ShortGPT (block influence), no training", "structured", "ranking", default=True),
    Method("magnitude", "magnitude-ranked units, no training", "structured", "ranking", default=True),
    Method("activation", "activation-ranked units, no training", "structured", "ranking", default=True),
    Method("magnitude-uniform", "magnitude-ranked units, uniform per layer, no training", "structured",
           "ranking", default=True),
    Method("activation-uniform", "activation-ranked units, uniform per layer (Wanda-sp), no training",
           "structured", "ranking", default=True),
    # fine-tuned sub-networks of the chosen size
    Method("shortgpt+distill", "ShortGPT + self-distillation", "+distill", "ranking+distill", base="shortgpt"),
    Method("magnitude+distill", "magnitude-ranked + self-distillation", "+distill", "ranking+distill",
           base="magnitude"),
    Method("activation+distill", "activation-ranked + self-distillation", "+distill", "ranking+distill",
           base="activation"),
    Method("magnitude-uniform+distill", "magnitude-ranked, uniform per layer + self-distillation", "+distill",
           "ranking+distill", base="magnitude-uniform"),
    Method("activation-uniform+distill", "activation-ranked, uniform per layer + self-distillation", "+distill",
           "ranking+distill", base="activation-uniform"),
    Method("ppn_bayes+distill", "ppn_bayes + self-distillation of the chosen size", "+distill", "fit+distill",
           base="ppn_bayes"),
    Method("ppn_bayes-frozen+distill", "ppn_bayes, frozen LM, + self-distillation of the chosen size", "+distill",
           "fit+distill", base="ppn_bayes-frozen"),
    Method("ppn_bayes-original+distill", "ppn_bayes, original teacher, + self-distillation of the chosen size",
           "+distill", "fit+distill", base="ppn_bayes-original"),
    Method("ppn_bayes+distill-long", f"ppn_bayes + {_LONGER}", "+distill", "fit+distill", base="ppn_bayes",
           finetune_repeat=LONG_FINETUNE),
    Method("ppn_bayes-frozen+distill-long", f"ppn_bayes, frozen LM, + {_LONGER}", "+distill", "fit+distill",
           base="ppn_bayes-frozen", finetune_repeat=LONG_FINETUNE),
    Method("ppn_bayes-original+distill-long", f"ppn_bayes, original teacher, + {_LONGER}", "+distill",
           "fit+distill", base="ppn_bayes-original", finetune_repeat=LONG_FINETUNE),
    # the uniform width cut
    Method("width", "uniform width cut (activation-ranked KV groups and MLP channels, alike in every layer), "
                    "no training", "width", "width cut"),
    Method("width-kd", "uniform width cut + distillation from the dense LM (width-kd)", "width",
           "width cut, distilled"),
    # width-kd at a smaller budget than the fit of record's (--width-kd-tokens), recorded apart so
    # that the targets still judge width-kd at the fit's tokens: ppn_bayes-short's peer
    Method("width-kd-short", "width-kd, a shorter run (same settings, fewer tokens)", "width",
           "width cut, distilled"),
    # unstructured and 2:4 sparsity
    Method("sparsegpt", "SparseGPT, unstructured", "sparse", "one-shot pruning", default=True),
    Method("wanda", "Wanda, unstructured", "sparse", "one-shot pruning", default=True),
    Method("sparsegpt-2:4", "SparseGPT, 2:4", "sparse", "one-shot pruning", default=True),
    Method("wanda-2:4", "Wanda, 2:4", "sparse", "one-shot pruning", default=True),
    Method("magnitude-zeros", "magnitude-zeros", "sparse", "zeros"),
)
#: id -> :class:`Method`, in registry order.
METHODS = MappingProxyType({m.id: m for m in REGISTRY})
#: The id of the fit of record.
RECORD = "ppn_bayes"


def _check_registry() -> None:
    """Ids unique; every base a method of the registry, built as its +distill method says."""
    if len(METHODS) != len(REGISTRY):
        raise ValueError("two methods of the registry share an id")
    if ids(family="fit of record") != (RECORD,):
        raise ValueError(f"the registry's one fit of record must be {RECORD!r}")
    for entry in REGISTRY:
        built = entry.builder.split("+")[0]
        if entry.base is not None and (entry.base not in METHODS or METHODS[entry.base].builder != built):
            raise ValueError(f"{entry.id} fine-tunes {entry.base!r}, which is no {built} method of the registry")




def method(name: str) -> Method:
    """The registry entry of ``name``; a clear error for an unknown id."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def ids(*, family: str | None = None, builder: str | None = None, quality: bool | None = None,
        default: bool | None = None) -> tuple[str, ...]:
    """The ids of the methods that match every filter given, in registry order."""
    return tuple(m.id for m in REGISTRY
                 if (family is None or m.family == family) and (builder is None or m.builder == builder)
                 and (quality is None or m.quality == quality) and (default is None or m.default == default))


def label(name: str) -> str:
    """The human name of a method id (the id itself for one the registry does not hold)."""
    return METHODS[name].label if name in METHODS else name


def listed(sizes) -> str:
    """Sizes as a command line takes them: ``0.9,0.7,0.5``."""
    return ",".join(f"{s:g}" for s in sizes)


#: FitConfig fields whose runs the report's ablation table sets against the same fit with the
#: field at its default (every other setting, the seed, text, tokens and windows the same): the
#: ablations that are a setting of one method rather than a method of their own.
SETTING_ABLATIONS = ("settle_steps", "average_steps")


def fit_changes(name: str, steps: int | None = None) -> dict:
    """The FitConfig changes of method ``name`` from the fit of record (none for a non-fit);
    with ``steps``, a change to :data:`ALL_STEPS` reads the fit's number of steps."""
    changes = dict(METHODS[name].fit) if name in METHODS else {}
    if steps is not None:
        changes = {k: steps if v == ALL_STEPS else v for k, v in changes.items()}
    return changes


_check_registry()
