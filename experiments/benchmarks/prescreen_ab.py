"""Issue #18, proof 4: does `--prescreen sim` reach the same goodput as a study without it in at most half the
GPU time? Two studies of one store, same trace, seed and `--trials` (screened proposals do not count as
trials: the prescreen changes which configurations launch, and in what order, not how many).

For each study: the launched trials, the proposals the simulator kept off the GPUs, the GPU time held
by its trials (launch to teardown, x GPUs, summed: the finalists' re-measurements are left out on both
sides), its best goodput, and the GPU time until its best-so-far goodput first came within TOLERANCE of
the other study's best; then both studies' best-so-far after each launch. "Same goodput" means within
TOLERANCE (default 5 %, about one run's noise on the H200; the finalists' confidence intervals say more where
both studies have them).

    python experiments/benchmarks/prescreen_ab.py STORE STUDY_WITH STUDY_WITHOUT [--tolerance 0.05]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tuner.records.trial import TrialRecord, records  # noqa: E402


@dataclass(frozen=True)
class Run:
    number: int
    gpu_s: float  # held by this trial: launch to teardown x GPUs
    goodput: float


def runs(study: optuna.Study) -> tuple[list[Run], int]:
    """The launched trials in the order they ended, and how many proposals were screened out."""
    launched: list[TrialRecord] = []
    screened = 0
    for record in records(study):
        if record.prescreened:
            screened += 1
        elif record.started_at is not None and record.ended_at is not None:
            launched.append(record)
    launched.sort(key=lambda r: r.ended_at or 0.0)
    return [Run(r.number, (r.ended_at - r.started_at) * (r.gpus or 1),  # type: ignore[operator]
                float(r.summary.get("goodput") or 0.0) if r.state == "COMPLETE" else 0.0)
            for r in launched], screened


def gpu_s_to_reach(trials: list[Run], target: float) -> float | None:
    held = 0.0
    for run in trials:
        held += run.gpu_s
        if run.goodput >= target:
            return held
    return None


def best_so_far(trials: list[Run]) -> list[tuple[float, float]]:
    """After each launch: (GPU-s held so far, best goodput so far)."""
    out, held, best = [], 0.0, 0.0
    for run in trials:
        held, best = held + run.gpu_s, max(best, run.goodput)
        out.append((held, best))
    return out


def main(argv: list[str]) -> int:
    tolerance = 0.05
    if "--tolerance" in argv:
        at = argv.index("--tolerance")
        tolerance, argv = float(argv[at + 1]), argv[:at] + argv[at + 2:]
    store, with_name, without_name = argv[0], argv[1], argv[2]
    url = store if "://" in store else f"sqlite:///{store}"
    studies = {name: runs(optuna.load_study(study_name=name, storage=url)) for name in (with_name, without_name)}
    best = {name: max((r.goodput for r in trials), default=0.0) for name, (trials, _) in studies.items()}
    print(f"| study | launched | screened out | GPU-min held by trials | best goodput req/s | GPU-min until within "
          f"{tolerance:.0%} of the other's best |")
    print("|---|---|---|---|---|---|")
    reach = {}
    for name, (trials, screened) in studies.items():
        other = best[without_name if name == with_name else with_name]
        reach[name] = gpu_s_to_reach(trials, (1 - tolerance) * other)
        held = sum(r.gpu_s for r in trials)
        print(f"| {name} | {len(trials)} | {screened} | {held / 60:.1f} | {best[name]:.2f} | "
              f"{'never' if reach[name] is None else f'{reach[name] / 60:.1f}'} |")
    curves = {name: best_so_far(trials) for name, (trials, _) in studies.items()}
    print(f"\n| launches | {with_name}: best req/s (GPU-min) | {without_name}: best req/s (GPU-min) |\n|---|---|---|")
    for k in range(max(len(c) for c in curves.values())):
        cells = [f"{c[k][1]:.2f} ({c[k][0] / 60:.1f})" if k < len(c) else "" for c in curves.values()]
        print(f"| {k + 1} | {cells[0]} | {cells[1]} |")
    mine, theirs = reach[with_name], gpu_s_to_reach(studies[without_name][0], (1 - tolerance) * best[without_name])
    if mine is None:
        print(f"\n{with_name} never came within {tolerance:.0%} of {without_name}'s best: proof 4 not shown")
    else:
        assert theirs is not None  # a study reaches its own best
        ratio = mine / theirs
        print(f"\nGPU time to {without_name}'s best (−{tolerance:.0%}): {mine / 60:.1f} min with the prescreen, "
              f"{theirs / 60:.1f} min without: {ratio:.2f} ({'at most' if ratio <= 0.5 else 'more than'} half)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
