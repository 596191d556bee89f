"""``ppn-bayes``: a thin command line. Each subcommand builds configuration and calls one
library function; the parsed arguments never travel further.

Every subcommand lives in a module of this package with a ``register(subparsers)``
function; :data:`COMMAND_MODULES` lists them in the order ``--help`` shows.

The error contract (docs/cli.md): before any work, :func:`ppn_bayes.cli.checks.check_command`
checks the device, every path the command reads and every place it writes. Any failure a
user can cause (:data:`USER_ERRORS`: bad arguments, missing, corrupt or unreadable files,
unwritable outputs, a full disk, no memory) ends with one line ``ppn-bayes COMMAND: error:
...`` and exit status 2; anything else (a bug) with one line naming the exception and
asking for ``--debug``, exit status 1; ``--debug`` shows the traceback of either.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from ..version import VERSION as __version__

COMMAND_MODULES = ["ppn_bayes.cli.fitting", "ppn_bayes.cli.summarize", "ppn_bayes.cli.deploy", "ppn_bayes.cli.speculate"]


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``PROG: error: MESSAGE``, exit 2.
    ``commands`` maps each subcommand's name to its parser (on the top-level parser)."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, show the Python traceback too")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ppn-bayes",
        description="Push puppet networks: fit a gate posterior once, cut an LM to any size.",
    )
    parser.add_argument("--version", action="version", version=f"ppn-bayes {__version__}")
    _add_debug(parser, False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():
        _add_debug(sub, argparse.SUPPRESS)  # `ppn-bayes COMMAND ... --debug` as well as `ppn-bayes --debug COMMAND`
    parser.commands = dict(subparsers.choices)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes a user's input or machine can cause (see the module's docstring)."""
    errors: list[type[BaseException]] = [ValueError, OSError, FloatingPointError, MemoryError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and err.args:
        text = f"missing key {err.args[0]!r}"
    return " ".join(text.split())  # one line, whatever the library wrote


@contextlib.contextmanager
def quiet_libraries(quiet: bool):
    """With ``quiet``, no progress bar from the libraries either: transformers' (and
    huggingface_hub's) loading bars, switched off through transformers' own switch, and the
    GGUF loader's de-quantising bar, whose module calls ``tqdm`` directly (it gets a
    ``tqdm`` that is disabled). Everything is restored afterwards."""
    if not quiet:
        yield
        return
    import functools

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        gguf_loader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # no gguf package: no GGUF bar either
        gguf_loader = None
    saved = getattr(gguf_loader, "tqdm", None)
    if saved is not None:
        gguf_loader.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved is not None:
            gguf_loader.tqdm = saved
        if was_enabled:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run ``ppn-bayes`` with ``argv``; returns the exit status (argparse's too: 0 after
    ``--help``, 2 after a bad argument) and raises nothing, unless ``--debug``."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's parser, not the top-level one
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    prefix = f"ppn-bayes {args.command}: error:"
    try:
        from .checks import check_command

        check_command(args)
        with quiet_libraries(bool(getattr(args, "quiet", False))):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"ppn-bayes {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the boundary: every error ends as one line
        if debug:
            raise
        if isinstance(err, _user_errors()):
            print(f"{prefix} {_message(err)}", file=sys.stderr)
            return 2
        print(f"{prefix} unexpected {type(err).__name__}: {_message(err)} (a bug? rerun with --debug for the "
              "traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
