"""The Pareto front of finished trials, the defaults baseline beside it, and the pick.

The pick ranks by the study's first objective (goodput, per GPU where trials use different numbers of
GPUs, when the study has an SLO): configurations that meet the SLO first, then reliable measurements,
then the objective, then the smallest SLO miss. It never comes back empty while a trial completed: with no
configuration meeting
the SLO it is the best of the rest (`tuner.records.recommend` says what it misses). When the trace offers
less load than the servers take (they all finish at the offered rate), objective values within
`LOAD_BOUND_TIE` of the best are a tie: fewer GPUs, then the lower first latency, win.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.loadgen.slo import parse_slo
from tuner.metrics import metric
from tuner.records.objectives import THROUGHPUT, Objectives
from tuner.records.trial import records

LOAD_BOUND_TIE = 0.03  # relative: differences below this are noise when the offered load is the bound
LOAD_BOUND_FRACTION = 0.9  # completing >= this fraction of the offered rate: bound by the offered load


@dataclass(frozen=True)
class Point:
    number: int
    engine: str
    config: dict[str, Any]
    summary: dict[str, Any]
    command: list[str]
    feasible: bool  # meets every SLO given to the study
    baseline: bool
    gpus: int = 1
    unreliable: tuple[str, ...] = field(default=())  # why the measurement cannot decide anything

    def value(self, name: str) -> float:
        value = metric(name).value(self.summary, self.gpus)
        if value is None:
            raise KeyError(f"trial {self.number} recorded no {name}")
        return value

    def get(self, name: str) -> float | None:
        return metric(name).value(self.summary, self.gpus)

    @property
    def slo_excess(self) -> float:
        """How far the worst SLO percentile is above its limit (value / limit); 0 within every limit."""
        slo_text, values = self.summary.get("slo"), self.summary.get("slo_value_ms") or {}
        if not slo_text:
            return 0.0
        worst = 0.0
        for target in parse_slo(slo_text).targets:
            value = values.get(target.name)
            worst = max(worst, float("inf") if value is None else value / target.limit_ms)
        return worst if worst > 1 else 0.0

    def load_bound(self, offered_rate: float) -> bool:
        served = self.summary.get("request_throughput") or 0.0
        return offered_rate > 0 and served >= LOAD_BOUND_FRACTION * offered_rate


def completed_points(study: optuna.Study) -> list[Point]:
    return [Point(number=r.number, engine=r.engine, config=r.config, summary=r.summary, command=r.command,
                  feasible=r.meets_slo, baseline=r.baseline, gpus=r.gpus or 1, unreliable=tuple(r.unreliable))
            for r in records(study, (TrialState.COMPLETE,)) if r.summary]


def _dominates(a: list[float], b: list[float]) -> bool:
    """a, b are to be minimised."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: list[Point], objectives: Objectives) -> list[Point]:
    def key(p: Point) -> list[float]:
        return [-p.value(THROUGHPUT), *(p.value(m) for m in objectives.latency)]

    front = [p for p in points if not any(_dominates(key(q), key(p)) for q in points if q is not p)]
    return sorted(front, key=lambda p: -p.value(THROUGHPUT))


def pick(points: list[Point], objectives: Objectives, prefer: str = "throughput",
         offered_rate: float = 0.0) -> Point | None:
    """The configuration to recommend (see the module docstring); `prefer="latency"` takes the lowest
    first latency among those meeting the SLO instead."""
    if not points:
        return None
    feasible = [p for p in points if p.feasible]
    if prefer == "latency" and feasible:
        first = objectives.latency[0]
        return min(feasible, key=lambda p: (bool(p.unreliable), p.value(first), -p.value(THROUGHPUT)))
    primary = metric(objectives.primary)

    def score(p: Point) -> float:
        value = p.get(primary.name)
        if value is None:
            return -float("inf")
        return value if primary.maximize else -value

    ranked = sorted(points, key=lambda p: (p.feasible, not p.unreliable, score(p), -p.slo_excess), reverse=True)
    top = ranked[0]
    peers = [p for p in ranked if (p.feasible, not p.unreliable) == (top.feasible, not top.unreliable)]
    if all(p.load_bound(offered_rate) for p in peers[:2]) and score(top) > 0:
        tied = [p for p in peers if score(p) >= score(top) * (1 - LOAD_BOUND_TIE)]
        first = objectives.latency[0]
        return min(tied, key=lambda p: (p.gpus, p.get(first) if p.get(first) is not None else float("inf")))
    return top


def front_table(front: list[Point], objectives: Objectives, baseline: Point | None, knobs: list[str],
                slo: bool | None = None, width: int = 120) -> str:
    """The front as a console table: goodput and the SLO column first when the trials were judged against an
    SLO (`slo`; by default when their summaries name one), GPUs per trial where they differ; the knobs go in
    lines under the table when their columns would pass `width`."""
    shown = front + ([baseline] if baseline is not None and baseline not in front else [])
    with_slo = any(p.summary.get("slo") for p in shown) if slo is None else slo
    several = len({p.gpus for p in shown}) > 1
    header = ["trial", "engine", *(["goodput", "SLO"] if with_slo else []), *(["GPUs"] if several else []),
              "tok/s", *objectives.latency]
    rows, settings = [], []
    for p in shown:
        goodput = p.summary.get("goodput")
        slo_cells = ["-" if goodput is None else f"{goodput:.2f}", "ok" if p.feasible else "miss"]
        rows.append([f"{p.number}{'*' if p.baseline else ''}{'!' if p.unreliable else ''}", p.engine,
                     *(slo_cells if with_slo else []), *([str(p.gpus)] if several else []),
                     f"{p.value(THROUGHPUT):.0f}", *(f"{p.value(m):.1f}" for m in objectives.latency)])
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
    notes = []
    if baseline is not None:
        notes.append("* = the engine's defaults")
    if any(p.unreliable for p in shown):
        notes.append("! = unreliable measurement")
    notes.append("latencies in ms" + (", goodput in req/s under the SLO" if with_slo else ""))
    lines.append(f"({'; '.join(notes)})")
    return "\n".join(lines)
