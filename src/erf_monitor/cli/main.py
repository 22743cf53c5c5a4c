"""The ``erf-monitor`` command line: ``demo``, ``analyze``, ``layers``, ``report``, ``compare``,
``replay``.

``main(argv)`` returns the exit code: 0 on success, 2 for a usage error (bad MODEL spec,
unknown layer, unreadable input file...), reported as one line on stderr without a traceback.
Each command lives in its own module of :mod:`erf_monitor.cli.commands`; this module builds
the top-level parser from them and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from erf_monitor.cli.commands import COMMANDS
from erf_monitor.cli.display import positions_table, results_table
from erf_monitor.cli.errors import CLIError
from erf_monitor.cli.options import Formatter

# positions_table and results_table: their home is cli.display; kept importable from here.
__all__ = ["main", "positions_table", "results_table"]


def _close_option(word: str, parser: argparse.ArgumentParser) -> str | None:
    """The option of ``parser`` closest to a mistyped ``word`` (``--input_size`` ->
    ``--input-size``), or ``None``."""
    import difflib

    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    flag = word.split("=", 1)[0]
    close = difflib.get_close_matches(flag.replace("_", "-").lower(), options, n=1, cutoff=0.6)
    return close[0] if close else None


class _Parser(argparse.ArgumentParser):
    """Usage errors end with a close match where there is one: ``invalid choice: 'analyse'``
    -> "did you mean 'analyze'?"."""

    def error(self, message: str) -> Any:  # argparse's own signature returns NoReturn
        import difflib
        import re

        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = re.findall(r"'([^']*)'", found.group(2))
            close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


def _unknown_options(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """One line for options ``parser`` does not know, with the closest known one."""
    bad = [w for w in extras if w.startswith("-")] or list(extras)
    text = f"unrecognized argument{'s' if len(bad) > 1 else ''}: {' '.join(bad)}"
    close = _close_option(bad[0], parser) if bad[0].startswith("--") else None
    return text + (f" (did you mean {close}?)" if close else "")


def _parser() -> argparse.ArgumentParser:
    """The top-level parser, one sub-parser per module of :data:`COMMANDS`."""
    from erf_monitor import __version__

    parser = _Parser(
        prog="erf-monitor",
        description="Measure and watch the effective receptive field (ERF) of vision models.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"erf-monitor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``erf-monitor`` command line.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for usage errors (one line on stderr).
    """
    parser = _parser()
    try:
        args, extras = parser.parse_known_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, argparse usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if extras:  # the subcommand's usage, not the top level's, and the closest option
        sub = _subparser(parser, args.command)
        sub.print_usage(sys.stderr)
        message = _unknown_options(sub, extras)
        print(f"erf-monitor {args.command}: error: {message}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"erf-monitor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erf-monitor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
