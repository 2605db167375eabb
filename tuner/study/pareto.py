"""The Pareto front of finished trials, the defaults baseline beside it, and the pick for an SLO."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.study.objectives import THROUGHPUT, Objectives, summary_key


@dataclass(frozen=True)
class Point:
    number: int
    engine: str
    config: dict[str, Any]
    summary: dict[str, Any]
    command: list[str]
    feasible: bool  # meets every SLO given to the study
    baseline: bool

    def value(self, metric: str) -> float:
        return float(self.summary[THROUGHPUT if metric == THROUGHPUT else summary_key(metric)])


def completed_points(study: optuna.Study) -> list[Point]:
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "summary" not in attrs:
            continue
        points.append(Point(number=trial.number, engine=attrs.get("engine", ""), config=attrs.get("config", {}),
                            summary=attrs["summary"], command=attrs.get("command", []),
                            feasible=all(c <= 0 for c in attrs.get("constraints", [])),
                            baseline=bool(attrs.get("baseline"))))
    return points


def _dominates(a: list[float], b: list[float]) -> bool:
    """a, b are to be minimised."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: list[Point], objectives: Objectives) -> list[Point]:
    def key(p: Point) -> list[float]:
        return [-p.value(THROUGHPUT), *(p.value(m) for m in objectives.latency)]

    front = [p for p in points if not any(_dominates(key(q), key(p)) for q in points if q is not p)]
    return sorted(front, key=lambda p: -p.value(THROUGHPUT))


def pick(points: list[Point], objectives: Objectives, prefer: str = "throughput") -> Point | None:
    """Best feasible point: highest throughput, or lowest first latency objective."""
    feasible = [p for p in points if p.feasible]
    if not feasible:
        return None
    if prefer == "latency":
        return min(feasible, key=lambda p: (p.value(objectives.latency[0]), -p.value(THROUGHPUT)))
    return max(feasible, key=lambda p: (p.value(THROUGHPUT), -p.value(objectives.latency[0])))


def front_table(front: list[Point], objectives: Objectives, baseline: Point | None, knobs: list[str],
                slo: bool = True, width: int = 120) -> str:
    """The front as a console table; knobs go in lines under it when their columns would pass `width`;
    the SLO column only when an SLO was given (without one every point is "feasible")."""
    header = ["trial", "engine", "tok/s", *objectives.latency, "goodput", *(["SLO"] if slo else [])]
    rows, settings = [], []
    shown = front + ([baseline] if baseline is not None and baseline not in front else [])
    for p in shown:
        mark = "*" if p.baseline else ""
        rows.append([f"{p.number}{mark}", p.engine, f"{p.value(THROUGHPUT):.0f}",
                     *(f"{p.value(m):.1f}" for m in objectives.latency),
                     "-" if p.summary.get("goodput") is None else f"{p.summary['goodput']:.2f}",
                     *(["ok" if p.feasible else "miss"] if slo else [])])
        settings.append([str(p.config.get(k, "-")) for k in knobs])

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]

    lines = table(header + knobs, [r + s for r, s in zip(rows, settings)])
    if max(map(len, lines)) > width:
        lines = table(header, rows)
        for row, values in zip(rows, settings):
            lines += textwrap.wrap(" ".join(f"{k}={v}" for k, v in zip(knobs, values)), width,
                                   initial_indent=f"  trial {row[0]}: ", subsequent_indent="      ")
    if baseline is not None:
        lines.append("(* = the engine's defaults, the baseline; latencies in ms, goodput in req/s under the SLO)")
    return "\n".join(lines)
