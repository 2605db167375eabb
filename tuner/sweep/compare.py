"""Compare a sweep run with the last run of each cell; a drop beyond the noise threshold is a regression.

Three figures per cell: the best goodput under the SLO, the hypervolume of the Pareto front over
(throughput, first latency) measured against the earlier run's reference point, and the throughput
of the engine's defaults. The noise threshold is k × the largest coefficient of variation seen when
the defaults were measured again (`--repeats`), never below the spec's floor; without repeats, the
threshold learned by the latest run that had them, else the spec's fixed default.
"""

from __future__ import annotations

import statistics

from tuner.report.hypervolume import hypervolume_2d
from tuner.sweep.results import CellComparison, CellResult, MetricChange, RunResults

NOISE_MULTIPLIER = 3.0


def coefficient_of_variation(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    if len(values) < 2 or not statistics.fmean(values):
        return None
    return statistics.stdev(values) / abs(statistics.fmean(values))


def learned_threshold(cells: list[CellResult]) -> float | None:
    cvs = [c.noise_cv for c in cells if c.noise_cv is not None]
    return NOISE_MULTIPLIER * max(cvs) if cvs else None


def choose_threshold(current: RunResults, earlier: list[RunResults], default: float,
                     floor: float) -> tuple[float, str]:
    """(threshold, where it came from). Repeats inside one run see less noise than there is between
    nights (other jobs on the machine, a warmer or cooler GPU), hence the floor."""
    for run in [current, *reversed(earlier)]:
        if run.learned_threshold is not None:
            source = "this run's repeats" if run is current else f"the repeats of run {run.run_id}"
            if run.learned_threshold < floor:
                return floor, f"the spec's floor ({NOISE_MULTIPLIER:g} × CV from {source} is " \
                              f"{run.learned_threshold:.1%})"
            return run.learned_threshold, f"learned from {source} ({NOISE_MULTIPLIER:g} × CV)"
    return default, "fixed default (run with --repeats N to learn it)"


def _change(name: str, old: float | None, new: float | None, threshold: float) -> MetricChange | None:
    if old is None:
        return None
    if new is None:
        return MetricChange(name, old, None, None, regressed=old > 0)
    change = new / old - 1 if old else None
    return MetricChange(name, old, new, change, regressed=change is not None and change < -threshold)


def compare_cell(cell: CellResult, before: CellResult, previous_run: str, threshold: float) -> CellComparison:
    comparison = CellComparison(cell.id, previous_run)
    if cell.status != "ok":
        comparison.regressed = True
        comparison.note = f"{cell.status} (the run before had {before.trials_completed} completed trials)"
        return comparison
    old_volume = new_volume = None
    if before.first_latency == cell.first_latency and before.reference:
        reference = (before.reference[0], before.reference[1])
        old_volume = hypervolume_2d([(t, lat) for t, lat in before.front], reference)
        new_volume = hypervolume_2d([(t, lat) for t, lat in cell.front], reference)
    else:
        comparison.note = "latency objective changed: hypervolume not compared"
    for change in (_change("best_goodput", before.best_goodput, cell.best_goodput, threshold),
                   _change("hypervolume", old_volume, new_volume, threshold),
                   _change("baseline_throughput", before.baseline_throughput, cell.baseline_throughput, threshold)):
        if change is not None:
            comparison.changes.append(change)
    comparison.regressed = any(c.regressed for c in comparison.changes)
    return comparison


def compare_run(current: RunResults, earlier: list[RunResults], threshold: float) -> list[CellComparison]:
    """Each cell against the latest earlier run in which that cell ran."""
    comparisons = []
    for cell in current.cells:
        if cell.status.startswith("skipped"):
            continue
        match = next(((run.run_id, c) for run in reversed(earlier) for c in run.cells
                      if c.id == cell.id and c.status == "ok"), None)
        if match is None:
            comparisons.append(CellComparison(cell.id, None, note="first run of this cell: nothing to compare with"))
            continue
        comparisons.append(compare_cell(cell, match[1], match[0], threshold))
    return comparisons
