"""Pictures for reports: parameter importances, and several studies' Pareto fronts on one chart."""

from __future__ import annotations

from pathlib import Path

from tuner.records.objectives import THROUGHPUT, Objectives
from tuner.records.pareto import pareto_front
from tuner.report.importance import Importances
from tuner.report.results import StudyResult
from tuner.tracking.plots import pyplot, save_png


def importance_png(importances: Importances, path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    names = list(importances.values)[::-1]  # largest at the top
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(names), 2) + 1.5))
    if names:
        ax.barh(names, [importances.values[n] for n in names], color="tab:blue")
        ax.set_xlabel(f"importance for {importances.target} (PED-ANOVA, share of the total)")
    else:
        ax.text(0.5, 0.5, importances.note, ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)


def fronts_png(results: list[StudyResult], metric: str, path: Path, title: str) -> Path | None:
    """Each study's front of throughput vs `metric` in its own colour, its other trials faint, its
    defaults baseline a star of that colour."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10").colors
    labels = [r.label for r in results]
    unique = len(set(labels)) == len(labels)
    for i, result in enumerate(results):
        colour = colours[i % len(colours)]
        front = sorted(pareto_front(result.points, Objectives((THROUGHPUT, metric))), key=lambda p: p.value(metric))
        ax.plot([p.value(metric) for p in front], [p.value(THROUGHPUT) for p in front], "o-", color=colour,
                label=result.label if unique else f"{result.name}: {result.label}")
        others = [p for p in result.points if p not in front]
        ax.scatter([p.value(metric) for p in others], [p.value(THROUGHPUT) for p in others], color=colour,
                   alpha=0.25, s=14)
        if result.baseline is not None:
            ax.scatter([result.baseline.value(metric)], [result.baseline.value(THROUGHPUT)], marker="*", s=220,
                       color=colour, edgecolors="black", zorder=5)
    ax.scatter([], [], marker="*", s=120, color="white", edgecolors="black", label="defaults (baseline)")
    ax.set_xlabel(f"{metric} (ms)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)
