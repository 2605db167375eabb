"""`tune report STUDY [STUDY ...]`: a study's report, or several studies side by side."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tuner.errors import InputError

DEFAULT_RUNS = Path("servetune-runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("studies", nargs="+", metavar="STUDY",
                        help="study name, or NAME@STORAGE_URL for a study in another storage; several are compared")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: servetune-runs/optuna.db)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="log the report to the study's MLflow parent run (default: mlflow.db beside a "
                             "SQLite storage, when there is one)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--slo", default=None, help="judge the trials against this SLO instead of the study's")
    parser.add_argument("--prefer", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--runs-dir", default=None,
                        help="folder holding <study>/trial-NNNN/ (default: the SQLite storage's folder)")
    parser.add_argument("--out", default=None,
                        help="where the report goes (default: the study's run folder; for several studies "
                             "servetune-runs/compare-<names>/)")


def _sqlite_dir(storage: str) -> Path | None:
    if not storage.startswith("sqlite:///"):
        return None
    path = Path(storage[len("sqlite:///"):])
    if not path.exists():
        raise InputError(f"no Optuna storage at {path}", field="storage")
    return path.parent


def _where(item: str, fallback_store: str, runs_dir: str | None) -> tuple[str, str, Path | None]:
    """`NAME` or `NAME@STORAGE_URL` -> (name, storage, folder of the trials' run folders)."""
    name, sep, storage = item.partition("@")
    storage = storage if sep else fallback_store
    storage_dir = _sqlite_dir(storage)
    return name, storage, Path(runs_dir) if runs_dir else storage_dir


def run(args: argparse.Namespace) -> int:
    from tuner.export.command import load_study
    from tuner.loadgen.slo import parse_slo
    from tuner.report.write import log_to_mlflow, write_comparison, write_study_report

    fallback_store = args.storage or f"sqlite:///{(DEFAULT_RUNS / 'optuna.db').resolve()}"
    studies = [_where(item, fallback_store, args.runs_dir) for item in args.studies]
    slo = parse_slo(args.slo) if args.slo else None
    several = len(studies) > 1
    if args.out:
        out = Path(args.out)
    elif several:
        names = "-vs-".join(name for name, _, _ in studies)
        out = DEFAULT_RUNS / ("compare-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", names)[:120])
    else:
        out = (studies[0][2] or DEFAULT_RUNS) / studies[0][0]

    reports = []
    for name, storage, runs_dir in studies:
        study = load_study(name, storage)
        run_dir = runs_dir / name if runs_dir else None
        report = write_study_report(study, out / name if several else out, slo, run_dir, args.prefer)
        reports.append(report)
        if not several:
            print(report.console.lstrip("\n"))
        print(f"\nreport: {report.files[0]}")
        mlflow_uri = None if args.no_mlflow else args.mlflow_uri
        if mlflow_uri is None and not args.no_mlflow and runs_dir and (runs_dir / "mlflow.db").exists():
            mlflow_uri = f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"
        buffer = (run_dir if run_dir and run_dir.is_dir() else report.files[0].parent) / "mlflow-buffer.jsonl"
        if mlflow_uri and log_to_mlflow(mlflow_uri, name, report, buffer):
            print(f"logged to MLflow, the parent run of study '{name}'")
    if several:
        markdown, png = write_comparison([r.result for r in reports], out)
        print(f"\ncomparison: {markdown}" + (f"\nfronts:     {png}" if png else ""))
    return 0
