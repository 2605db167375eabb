"""`tune export --study NAME`: the recommended serve command, ready to paste."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name (see `tune` output)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (default: servetune-runs/optuna.db)")
    parser.add_argument("--slo", default=None, help="pick among trials meeting this SLO, e.g. ttft_p99=800ms")
    parser.add_argument("--prefer", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--format", choices=["shell", "yaml"], default="shell")


def run(args: argparse.Namespace) -> int:
    from tuner.export.command import choose, load_study, shell_line, yaml_config
    from tuner.loadgen.slo import parse_slo

    storage = args.storage or f"sqlite:///{Path('servetune-runs/optuna.db').resolve()}"
    study = load_study(args.study, storage)
    point = choose(study, parse_slo(args.slo) if args.slo else None, args.prefer)
    print(shell_line(point) if args.format == "shell" else yaml_config(point), end="\n" if args.format == "shell" else "")
    return 0
