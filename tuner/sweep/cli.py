"""`tune sweep SPEC.yaml`: run every cell of the spec's matrix, compare with the last run, exit 3 on regression."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuner.errors import InputError

EXIT_REGRESSION = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="sweep spec YAML (see experiments/sweeps/nightly-sim.yaml)")
    parser.add_argument("--out", default=None,
                        help="results folder: runs/<run-id>.json, .md and latest.md (default: <spec folder>/<name>/)")
    parser.add_argument("--work", default=None,
                        help="studies, trial logs and MLflow store (default: servetune-runs/sweeps/<name>/)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measure the engine's defaults N more times per cell to learn the noise threshold "
                             "(default: the spec's `repeats`, else 0)")
    parser.add_argument("--compare-only", action="store_true",
                        help="run nothing: compare the latest recorded run with the ones before it again")


def run(args: argparse.Namespace) -> int:
    from tuner.report.results import StudyResult
    from tuner.report.write import write_comparison
    from tuner.sweep.compare import choose_threshold, compare_run
    from tuner.sweep.results import history
    from tuner.sweep.run import run_sweep
    from tuner.sweep.spec import load_spec
    from tuner.sweep.summary import summary_markdown

    spec = load_spec(args.spec)
    repeats = spec.repeats if args.repeats is None else args.repeats
    if repeats < 0:
        raise InputError("must be 0 or more", field="repeats")
    out = Path(args.out) if args.out else spec.path.parent / spec.name
    runs_dir = out / "runs"
    earlier = history(runs_dir) if runs_dir.is_dir() else []
    studies: list[StudyResult] = []
    if args.compare_only:
        if not earlier:
            raise InputError(f"no recorded run in {runs_dir}", field="compare-only")
        current, earlier = earlier[-1], earlier[:-1]
    else:
        work = Path(args.work) if args.work else Path("servetune-runs") / "sweeps" / spec.name
        current, studies = run_sweep(spec, work, repeats)
    current.noise_threshold, current.noise_source = choose_threshold(current, earlier, spec.noise_threshold,
                                                                     spec.noise_floor)
    current.comparisons = compare_run(current, earlier, current.noise_threshold)
    current.regression = any(c.regressed for c in current.comparisons)

    runs_dir.mkdir(parents=True, exist_ok=True)
    fronts = None
    if studies:
        _, png = write_comparison(studies, runs_dir / current.run_id)
        fronts = str(png) if png else None
    summary = summary_markdown(current, fronts or _earlier_fronts(runs_dir, current.run_id))
    (runs_dir / f"{current.run_id}.json").write_text(current.to_json())
    (runs_dir / f"{current.run_id}.md").write_text(summary)
    (out / "latest.md").write_text(summary)
    print("\n" + summary)
    print(f"results: {runs_dir / (current.run_id + '.json')}")
    return EXIT_REGRESSION if current.regression else 0


def _earlier_fronts(runs_dir: Path, run_id: str) -> str | None:
    png = runs_dir / run_id / "fronts.png"
    return str(png) if png.exists() else None
