"""Write a study's report (Markdown, PNGs, HTML) or a side-by-side comparison, and log it to MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from tuner.loadgen.slo import SLO
from tuner.report.figures import fronts_png, importance_png
from tuner.report.importance import Importances, param_importances
from tuner.report.markdown import comparison_markdown, console_text, front_text, study_markdown
from tuner.report.results import StudyResult, load_result
from tuner.tracking.plots import NO_PNG, pareto_html, pareto_png


@dataclass
class WrittenReport:
    result: StudyResult
    importances: Importances
    files: list[Path]  # report.md first
    console: str
    metrics: dict[str, float]


def write_study_report(study: optuna.Study, out_dir: Path, slo: SLO | None = None, run_dir: Path | None = None,
                       prefer: str = "throughput") -> WrittenReport:
    """`run_dir`: where the study's trial folders are (for goodput under another SLO); default `out_dir`."""
    result = load_result(study, slo, run_dir or out_dir, prefer)
    importances = param_importances(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{study.study_name}: {result.label}"
    files: list[Path | None] = [out_dir / "report.md"]
    if result.points:
        files.append(pareto_png(result.points, result.front, result.objectives, out_dir / "pareto.png", title))
        files.append(pareto_html(result.points, result.front, result.objectives, out_dir / "pareto.html", title))
        (out_dir / "pareto.txt").write_text(front_text(result) + "\n")
        files.append(out_dir / "pareto.txt")
    files.append(importance_png(importances, out_dir / "importance.png", title))
    written = [f for f in files if f is not None]
    pngs = len(written) == len(files)
    written[0].write_text(study_markdown(result, importances, pngs))
    console = console_text(result, importances) + ("" if pngs else f"\nnote: {NO_PNG}")
    return WrittenReport(result=result, importances=importances, files=written, console=console,
                         metrics=result.metrics())


def write_comparison(results: list[StudyResult], out_dir: Path) -> tuple[Path, Path | None]:
    """comparison.md and fronts.png (None without matplotlib, the `plots` extra)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = results[0].first_latency
    title = f"Pareto fronts: output tokens/s vs {metric}"
    if any(r.simulated for r in results):
        title += " (SIMULATED)"
    png = fronts_png(results, metric, out_dir / "fronts.png", title)
    markdown = out_dir / "comparison.md"
    markdown.write_text(comparison_markdown(results, png.name if png else None))
    return markdown, png


def log_to_mlflow(tracking_uri: str, study_name: str, report: WrittenReport, buffer_path: Path) -> bool:
    """Attach the report's files and figures to the study's MLflow parent run (created if missing).
    False when MLflow could not be reached: the records wait in `buffer_path` (the study's run folder's
    buffer is written by the next `tune` run of the study)."""
    from tuner.tracking.mlflow_log import StudyTracker

    tracker = StudyTracker(tracking_uri, "servetune", study_name, buffer_path)
    tracker.log_study_artifacts(report.files, report.metrics)
    return tracker.pending() == 0
