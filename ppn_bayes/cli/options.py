"""Command-line flags built from the frozen configuration dataclasses, and the argument
types that refuse bad numbers while the command line is parsed."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from ..core.config import CONCERNS, RECIPE_SPANS, RECIPES, FitConfig, recipe_settings

#: The namespace attribute that holds the settings given on the command line (a set of field
#: names): what a recipe (``--recipe``) leaves as given.
GIVEN = "settings_given"


def _note_given(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, GIVEN, getattr(namespace, GIVEN, frozenset()) | {dest})


class _Given(argparse.Action):
    """``store``, noting the setting as given on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _note_given(namespace, self.dest)


class _GivenBool(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``, noting the setting as given on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


def _number(kind: type, text: str, what: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _number(int, text, "a positive integer (at least 1)", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    """An integer of at least 0."""
    return _number(int, text, "a non-negative integer", lambda v: v >= 0)


def finite_float(text: str) -> float:
    """A number that is neither NaN nor infinite."""
    return _number(float, text, "a finite number", lambda v: True)


def positive_float(text: str) -> float:
    """A finite number above 0."""
    return _number(float, text, "a positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    """A finite number of at least 0."""
    return _number(float, text, "a non-negative number", lambda v: v >= 0)


def size_fraction(text: str) -> float:
    """A size: a fraction of the decoder's parameters in (0, 1]."""
    value = _number(float, text, "a number", lambda v: True)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"sizes must lie in (0, 1], got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A probability strictly between 0 and 1."""
    return _number(float, text, "a number in (0, 1)", lambda v: 0 < v < 1)


def unit_interval(text: str) -> float:
    """A probability in [0, 1]."""
    return _number(float, text, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def decay_rate(text: str) -> float:
    """A decay rate of a moving average, in [0, 1)."""
    return _number(float, text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: Argument types by a field's ``bound`` metadata and its type.
_CONVERT = {(None, int): int, (None, float): finite_float, ("positive", int): positive_int,
            ("positive", float): positive_float, ("nonnegative", int): nonnegative_int,
            ("nonnegative", float): nonnegative_float, ("decay", float): decay_rate}


def add_config_options(parser: argparse.ArgumentParser, cls: type, defaults, *, skip: tuple[str, ...] = (),
                       groups: dict | None = None) -> None:
    """One flag ``--field-name`` per field of the settings dataclass ``cls``, documented
    from its ``help`` metadata with its default in ``defaults``; the flag's values are
    checked by its ``bound`` (``positive``, ``nonnegative``, ``decay``: [0, 1)) and ``choices`` metadata where
    it has them. ``groups`` maps a field's ``concern`` to the argument group its flag
    joins (default: ``parser`` itself)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        kind = hints[f.name]
        target = (groups or {}).get(f.metadata["concern"], parser)
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            target.add_argument(_flag(f.name), dest=f.name, action=_GivenBool, default=default, help=help_text)
        elif typing.get_origin(kind) is tuple:  # sizes
            target.add_argument(_flag(f.name), dest=f.name, action=_Given, type=size_fraction, nargs="*",
                                default=default, metavar="SIZE", help=help_text)
        else:
            plain = kind if kind in (int, float, str) else next(a for a in typing.get_args(kind) if a is not type(None))
            convert = _CONVERT.get((f.metadata.get("bound"), plain), str)
            target.add_argument(_flag(f.name), dest=f.name, action=_Given, type=convert, default=default,
                                choices=f.metadata.get("choices"), help=help_text)


def config_from(args: argparse.Namespace, cls: type, *, skip: tuple[str, ...] = ()) -> dict:
    """The values of the flags of :func:`add_config_options` for ``cls``, as ``{field: value}``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def add_fit_options(parser: argparse.ArgumentParser, defaults: FitConfig = FitConfig(), *,
                    skip: tuple[str, ...] = ()) -> None:
    """One flag per :class:`FitConfig` field, documented from its metadata, in one group
    per concern (:data:`~ppn_bayes.core.config.CONCERNS`)."""
    parser.add_argument("--recipe", default="default", choices=list(RECIPES),
                        help="named settings applied before the flags below, which win where given: 'record' is "
                             "the fit of record (docs/method.md: " + ", ".join(
                                 f"{k}={v}" for k, v in RECIPES["record"].items()) + "), and its steps set "
                             f"apart scaled to --steps (of its {RECIPE_SPANS['record'][0]}: " + ", ".join(
                                 f"{k}={v}" for k, v in RECIPE_SPANS["record"][1].items()) + ") (default: "
                             "default, the defaults shown)")
    groups = {name: parser.add_argument_group(f"fit settings: {name} (FitConfig)") for name in CONCERNS}
    add_config_options(parser, FitConfig, defaults, skip=skip, groups=groups)


def fit_config_from(args: argparse.Namespace, *, base: FitConfig = FitConfig(), skip: tuple[str, ...] = ()) -> FitConfig:
    """The fit settings of :func:`add_fit_options`' flags over ``base``: ``--recipe``'s settings
    (its steps set apart scaled to the fit's ``steps``) where a flag was not given, the flags'
    values everywhere else."""
    values = config_from(args, FitConfig, skip=skip)
    given = getattr(args, GIVEN, frozenset())
    steps, train_lm = (values.get(k, getattr(base, k)) for k in ("steps", "train_lm"))
    recipe = recipe_settings(getattr(args, "recipe", "default"), steps, train_lm=train_lm)
    values.update({k: v for k, v in recipe.items() if k not in given and k not in skip})
    return base.replace(**values)
