"""`tune export --study NAME`: the recommended serve command, ready to paste or deploy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ["shell", "yaml", "k8s", "docker"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name (see `tune` output)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (default: servetune-runs/optuna.db)")
    parser.add_argument("--slo", default=None, help="pick among trials meeting this SLO, e.g. ttft_p99=800ms")
    parser.add_argument("--prefer", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--format", choices=FORMATS, default="shell",
                        help="shell line, YAML config file, Kubernetes Deployment + Service, or `docker run` line "
                             "(trtllm: shell and yaml, with its options file)")
    parser.add_argument("--model", default=None,
                        help="k8s/docker: the model to serve instead of the one tuned (e.g. a hub id for a local path)")
    parser.add_argument("--image", default=None,
                        help="k8s/docker: container image (default: the official image of the tuned version, "
                             "else :latest)")
    parser.add_argument("--name", default=None, help="k8s/docker: object and container name")


def run(args: argparse.Namespace) -> int:
    from tuner.export.command import (
        choose,
        load_study,
        options_file,
        output_note,
        shell_line,
        study_objectives,
        yaml_config,
    )
    from tuner.loadgen.slo import parse_slo

    storage = args.storage or f"sqlite:///{Path('servetune-runs/optuna.db').resolve()}"
    study = load_study(args.study, storage)
    point = choose(study, parse_slo(args.slo) if args.slo else None, args.prefer)
    if not point.feasible:
        print(f"note: no trial met every SLO percentile; trial {point.number} has the best "
              f"{study_objectives(study).primary} (see `tune report {args.study}` for what it misses)",
              file=sys.stderr)
    note = output_note(study, point)
    if note:  # a comment in every format, so that it travels with the exported file
        print(note)
    if args.format == "shell":
        print(shell_line(point, options_file(study, point)))
    elif args.format == "yaml":
        print(yaml_config(point, options_file(study, point)), end="")
    else:
        from tuner.export.deploy import container_for, docker_line, dropped_note, k8s_manifest, local_model_note

        container = container_for(point, study, model=args.model, image=args.image, name=args.name)
        for note in (local_model_note(container), dropped_note(container)):
            if note:
                print(note, file=sys.stderr)
        print(k8s_manifest(container) if args.format == "k8s" else docker_line(container),
              end="" if args.format == "k8s" else "\n")
    return 0
