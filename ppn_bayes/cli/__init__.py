"""``ppn-bayes``: a thin command line. Each subcommand builds configuration and calls one
library function; the parsed arguments never travel further.

Every subcommand lives in a module of this package with a ``register(subparsers)``
function; :data:`COMMAND_MODULES` lists them in the order ``--help`` shows.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__

COMMAND_MODULES = ["ppn_bayes.cli.fitting", "ppn_bayes.cli.summarize", "ppn_bayes.cli.deploy", "ppn_bayes.cli.speculate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppn-bayes",
        description="Push puppet networks: fit a gate posterior once, cut an LM to any size.",
    )
    parser.add_argument("--version", action="version", version=f"ppn-bayes {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"ppn-bayes {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
