"""Generate ``docs/cli.md`` from the argparse parser of ``ppn-bayes``.

Run ``python docs/gen_cli.py`` after adding or changing a subcommand or a flag;
``tests/test_docs.py`` fails while ``docs/cli.md`` is out of date or lacks a flag.
``python docs/gen_cli.py --check`` exits with status 1 when the file is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CLI_MD = Path(__file__).resolve().parent / "cli.md"

HEADER = """# Command line

`ppn-bayes COMMAND [options]`; `ppn-bayes COMMAND --help` prints the same text as this page.
Every subcommand builds its configuration and calls one library function (see the
[Python API](api.md)).

**Errors.** Before any work (before a model is loaded), every command checks the device,
every path it reads (present, of the right kind, readable: model configs and tokenizer
files, checkpoints, mask files, token files and their ids against the vocabulary, text
files as UTF-8), every place it writes (writable; a folder where a folder is needed; absent
unless `--overwrite`, or `--resume` for `fit`), and `--seq-len` against the model's maximum
positions. Any failure a user can cause (a bad argument; a missing, corrupt or unreadable
file; an unwritable output or a full disk; too little memory) ends with one line,
`ppn-bayes COMMAND: error: ...`, and exit status 2, with nothing half-written left behind.
Anything else is a bug: one line, `ppn-bayes COMMAND: error: unexpected TypeError: ...
(a bug? rerun with --debug ...)`, and exit status 1. `--debug` (before or after `COMMAND`)
shows the Python traceback of either; Ctrl-C ends with `interrupted` and status 130.

**Crashes.** Every file is written to a temporary beside it (`.NAME.PID.*.tmp`), flushed to
disk and renamed into place. A checkpoint is replaced by two renames (the old one aside to
`.NAME.old`, the new one in); when a run is killed between them, the next command that
reads the checkpoint (or `fit --resume`) renames the old one back, and removes the
temporaries that killed runs left behind.

This page is generated from the parser by `python docs/gen_cli.py`; do not edit it by hand.
"""


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of every subcommand, in ``--help`` order."""
    found = []
    for action in parser._actions:  # argparse keeps subparsers in a private action
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _flag_cell(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if action.nargs in ("+", "*"):
        metavar = f"{metavar} ..."
    elif isinstance(action.nargs, int) and action.nargs > 1:
        metavar = " ".join([metavar] * action.nargs)
    return f"{names} `{metavar}`"


def _help_cell(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""  # fills %(default)s
    if action.choices and "choices" not in text and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return _escape(" ".join(text.split()))


def render(parser: argparse.ArgumentParser) -> str:
    """The Markdown of ``docs/cli.md`` for ``parser``."""
    lines = [HEADER]
    commands = subcommands(parser)
    lines.append("| command | what it does |\n|---|---|")
    for name, help_text, _ in commands:
        lines.append(f"| [`{name}`](#{name}) | {_escape(help_text)} |")
    lines.append("")
    for name, help_text, sub in commands:
        lines.append(f"## {name}\n")
        if sub.description:
            lines.append(" ".join(sub.description.split()) + "\n")
        usage = " ".join(sub.format_usage().replace("usage: ", "", 1).split())
        lines.append(f"```text\n{usage}\n```\n")
        for group in sub._action_groups:
            actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS
                       and not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"positional arguments": "Arguments", "options": "Options"}.get(group.title, group.title)
            lines.append(f"**{_escape(title[0].upper() + title[1:])}**\n")
            positional = all(not a.option_strings for a in actions)
            lines.append(f"| {'argument' if positional else 'flag'} | meaning |\n|---|---|")
            for action in actions:
                lines.append(f"| {_flag_cell(action)} | {_help_cell(action, sub)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/cli.md`` (or, with ``--check``, report whether it is current)."""
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    args = options.parse_args(argv)
    from ppn_bayes.cli import build_parser

    text = render(build_parser())
    if args.check:
        current = CLI_MD.read_text() if CLI_MD.exists() else ""
        if current != text:
            print("docs/cli.md is out of date: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(text)
    print(f"wrote {CLI_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
