"""The ``erf-monitor`` commands, one module each: ``add_parser(subparsers)`` adds the command
and its options (``set_defaults(func=run)``), ``run(args) -> int`` runs it.

:data:`COMMANDS` lists them in the order ``erf-monitor --help`` shows them.
"""

from erf_monitor.cli.commands import analyze, compare, demo, layers, replay, report

__all__ = ["COMMANDS"]

COMMANDS = (demo, analyze, layers, report, compare, replay)
