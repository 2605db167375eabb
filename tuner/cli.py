"""`tune`: tune a server (default), or one of the subcommands."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from tuner.errors import InputError

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "workload": ("tuner.workload.cli", "inspect and slice captured traces"),
    "bench": ("tuner.loadgen.cli", "replay a workload against a running OpenAI-compatible server"),
    "sim-serve": ("tuner.simulator.cli", "serve the simulated engine (a performance model, not a GPU)"),
    "export": ("tuner.export.cli", "print the recommended serve command of a study"),
    "report": ("tuner.report.cli", "a study's report (Pareto front, baseline, goodput, importances); several side by side"),
    "sweep": ("tuner.sweep.cli", "run a matrix of studies from a spec and compare with the last run (nightly)"),
    "run": ("tuner.study.cli", "tune a server configuration against a workload (the default)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
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
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    try:
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
