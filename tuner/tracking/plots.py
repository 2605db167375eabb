"""Pictures of a study: latency vs throughput with the Pareto front, as PNG and interactive HTML."""

from __future__ import annotations

from pathlib import Path

from tuner.records.objectives import THROUGHPUT, Objectives
from tuner.records.pareto import Point, pareto_front


def pyplot():
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    fig.tight_layout(rect=rect)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def pareto_png(points: list[Point], front: list[Point], objectives: Objectives, path: Path, title: str) -> Path:
    plt = pyplot()
    metrics = list(objectives.latency)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 5.5), squeeze=False)
    front_numbers = {p.number for p in front}
    for ax, metric in zip(axes[0], metrics):
        others = [p for p in points if p.number not in front_numbers]
        ax.scatter([p.value(metric) for p in others], [p.value(THROUGHPUT) for p in others],
                   c=["tab:gray" if p.feasible else "tab:red" for p in others], alpha=0.6, label="trials")
        ax.scatter([p.value(metric) for p in front], [p.value(THROUGHPUT) for p in front], color="tab:blue",
                   label="Pareto-optimal (all objectives)")
        ordered = sorted(pareto_front(points, Objectives((THROUGHPUT, metric))), key=lambda p: p.value(metric))
        ax.step([p.value(metric) for p in ordered], [p.value(THROUGHPUT) for p in ordered], where="post",
                color="tab:blue", alpha=0.6, label=f"front: throughput vs {metric}")
        for p in points:
            if p.baseline:
                ax.scatter([p.value(metric)], [p.value(THROUGHPUT)], marker="*", s=250, color="tab:orange",
                           label="defaults (baseline)", zorder=5)
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
    # below the axes, so it hides no point (the defaults' star least of all)
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title)
    return save_png(fig, path, rect=(0, 0.1, 1, 1))


def pareto_html(points: list[Point], front: list[Point], objectives: Objectives, path: Path, title: str) -> Path:
    import plotly.graph_objects as go

    metric = objectives.latency[0]
    front_numbers = {p.number for p in front}

    def hover(p: Point) -> str:
        knobs = "<br>".join(f"{k}={v}" for k, v in p.config.items())
        return f"trial {p.number} ({p.engine})<br>{knobs}"

    fig = go.Figure()
    for label, subset, color in (
        ("trials", [p for p in points if p.number not in front_numbers], "gray"),
        ("Pareto front", sorted(front, key=lambda p: p.value(metric)), "royalblue"),
        ("defaults (baseline)", [p for p in points if p.baseline], "orange"),
    ):
        fig.add_trace(go.Scatter(x=[p.value(metric) for p in subset], y=[p.value(THROUGHPUT) for p in subset],
                                 mode="markers+lines" if label == "Pareto front" else "markers", name=label,
                                 marker=dict(color=color, size=14 if label.startswith("defaults") else 9),
                                 text=[hover(p) for p in subset], hoverinfo="text+x+y"))
    fig.update_layout(title=title, xaxis_title=f"{metric} (ms)", yaxis_title="output tokens/s")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True)  # plotly.js inside the file: it opens offline
    return path
