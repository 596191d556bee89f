"""Command-line flags built from the frozen configuration dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..config import FIT_HELP, FitConfig


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
        else:
            convert = {int: int, float: float, str: str}.get(kind, int if "int" in str(kind) else str)
            group.add_argument(_flag(f.name), dest=f.name, type=convert, default=default, help=help_text)


def fit_config_from(args: argparse.Namespace, *, base: FitConfig = FitConfig(), skip: tuple[str, ...] = ()) -> FitConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FitConfig) if f.name not in skip}
    return base.replace(**values)
