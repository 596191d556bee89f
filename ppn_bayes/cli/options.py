"""Command-line flags built from the frozen configuration dataclasses, and the argument
types that refuse bad numbers while the command line is parsed."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from ..core.config import FIT_HELP, FitConfig


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fit_options(parser: argparse.ArgumentParser, defaults: FitConfig = FitConfig(), *,
                    skip: tuple[str, ...] = ()) -> None:
    """One flag per :class:`FitConfig` field, documented from ``FIT_HELP``."""
    group = parser.add_argument_group("fit settings (FitConfig)")
    hints = typing.get_type_hints(FitConfig)
    for f in dataclasses.fields(FitConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        kind = hints[f.name]
        help_text = f"{FIT_HELP[f.name]} (default: {default})"
        if kind is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        elif typing.get_origin(kind) is tuple:  # sizes
            group.add_argument(_flag(f.name), dest=f.name, type=size_fraction, nargs="*", default=default,
                               metavar="SIZE", help=help_text)
        else:
            convert = {int: int, float: finite_float, str: str}.get(kind, int if "int" in str(kind) else str)
            group.add_argument(_flag(f.name), dest=f.name, type=convert, default=default, help=help_text)


def fit_config_from(args: argparse.Namespace, *, base: FitConfig = FitConfig(), skip: tuple[str, ...] = ()) -> FitConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FitConfig) if f.name not in skip}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return base.replace(**values)
