"""The Markdown summary of a sweep run, for a CI job summary or a chat message."""

from __future__ import annotations

from tuner.report.markdown import md_table
from tuner.sweep.results import CellComparison, MetricChange, RunResults


def _figure(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if digits < 0 else f"{value:,.{digits}f}"


def _with_change(value: float | None, change: MetricChange | None, digits: int) -> str:
    text = _figure(value, digits)
    if change is None or change.change is None:
        return text + (" (gone)" if change is not None and change.regressed else "")
    return f"{text} ({change.change:+.1%}){' ⚠' if change.regressed else ''}"


def summary_markdown(run: RunResults, fronts_png: str | None = None) -> str:
    simulated = any(c.simulated for c in run.cells)
    by_cell: dict[str, CellComparison] = {c.cell: c for c in run.comparisons}
    regressed = [c for c in run.comparisons if c.regressed]
    compared = [c for c in run.comparisons if c.previous_run]
    if regressed:
        verdict = f"**REGRESSION** in {len(regressed)} of {len(compared)} compared cell(s)"
    elif compared:
        verdict = f"**No regression** in {len(compared)} compared cell(s)"
    else:
        verdict = "**No earlier run to compare with**"
    lines = [f"## servetune sweep `{run.spec}`: run {run.run_id}" + (" (SIMULATED)" if simulated else ""), "",
             f"{verdict}. Noise threshold {run.noise_threshold:.1%}: {run.noise_source}. "
             f"SLO `{run.slo or 'none'}`.", ""]
    rows = []
    for cell in run.cells:
        comparison = by_cell.get(cell.id)
        changes = {c.name: c for c in comparison.changes} if comparison else {}
        if comparison is not None and comparison.regressed:
            worst = [f"{c.name} {c.change:+.1%}" if c.change is not None else f"{c.name} gone"
                     for c in comparison.changes if c.regressed]
            verdict_text = "regression: " + (", ".join(worst) or comparison.note)
        elif cell.status != "ok" or comparison is None:
            verdict_text = cell.status
        elif comparison.previous_run is None:
            verdict_text = comparison.note
        else:
            verdict_text = "ok" + (f" ({comparison.note})" if comparison.note else "")
        rows.append([f"`{cell.id}`", f"{cell.trials_completed}/{cell.trials_stopped}/{cell.trials_failed}",
                     _with_change(cell.best_goodput, changes.get("best_goodput"), 2),
                     _with_change(cell.hypervolume, changes.get("hypervolume"), -1),
                     _with_change(cell.baseline_throughput, changes.get("baseline_throughput"), 0),
                     _figure(cell.best_throughput, 0),
                     comparison.previous_run or "-" if comparison else "-", verdict_text])
    lines.append(md_table(["cell", "trials ok/stopped/failed", "best goodput req/s", "hypervolume", "defaults tok/s",
                           "best tok/s", "compared with", "verdict"], rows))
    lines += ["", "Changes are against the last run of the same cell; ⚠ marks a drop beyond the noise threshold. "
                  "Hypervolume: area dominated by the Pareto front in (output tok/s, "
                  f"{next((c.first_latency for c in run.cells if c.first_latency), 'latency')}) up to the earlier "
                  "run's reference point."]
    if fronts_png:
        lines += ["", f"Every cell's Pareto front on one chart: `{fronts_png}`"]
    if simulated:
        lines += ["", "SIMULATED cells come from servetune's performance model, not from a GPU."]
    return "\n".join(lines) + "\n"
