"""`tune`: tune a server (default), or one of the subcommands."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import signal
import sys
import threading
from typing import NoReturn

from tuner import __version__
from tuner.errors import InputError

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "workload": ("tuner.workload.cli", "inspect and slice captured traces"),
    "bench": ("tuner.loadgen.cli", "replay a workload against a running OpenAI-compatible server"),
    "sim-serve": ("tuner.simulator.cli", "serve the simulated engine (a performance model, not a GPU)"),
    "export": ("tuner.export.cli", "print the recommended serve command of a study"),
    "report": ("tuner.report.cli",
               "a study's report (Pareto front, baseline, goodput, importances); several side by side"),
    "sweep": ("tuner.sweep.cli", "run a matrix of studies from a spec and compare with the last run (nightly)"),
    "run": ("tuner.study.cli", "tune a server configuration against a workload (the default)"),
}


class _DefaultsFormatter(argparse.HelpFormatter):
    """`--help` shows each option's default, unless its help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS  # (0 is a default worth showing; False is a plain switch)
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only `command`'s module is imported for its options (all when None):
    importing them all costs seconds (numpy, aiohttp, SQLAlchemy, Optuna)."""
    parser = _Parser(prog="tune", description=__doc__,
                     epilog="`tune --workload F ...` is `tune run --workload F ...`; "
                            "`servetune` is the same program where Ray's own `tune` shadows it.")
    parser.add_argument("--version", action="version", version=f"servetune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def _default_sigint() -> None:
    """A job started in the background by a script inherits SIGINT ignored; Ctrl-C (or `kill -INT`) must
    still stop `tune` cleanly."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    _default_sigint()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        build_parser("").print_help()
        return 0
    if argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"tune: error: unknown command '{argv[0]}'; {hint}(commands: {', '.join(SUBCOMMANDS)})",
              file=sys.stderr)
        return 2
    if argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]
    try:
        # a subcommand may rewrite its own arguments first (sim-serve's --config FILE becomes flags)
        expand = getattr(importlib.import_module(SUBCOMMANDS[argv[0]][0]), "expand_argv", None) \
            if argv[0] in SUBCOMMANDS else None
        if expand is not None:
            argv = [argv[0], *expand(argv[1:])]
        args = build_parser(argv[0] if argv[0] in SUBCOMMANDS else "").parse_args(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
    except InputError as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tune ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        return 0
