"""Multi-fidelity over trace length, and finalists measured again with confidence intervals.

Successive halving, asynchronous (ASHA): every trial replays the whole trace, but is judged at rungs,
the first 1/4, 1/2 and all of the trace (by arrival time). When every request of a rung's window has
finished, the window's score (meets the SLO first, then goodput, or output throughput without an SLO)
is compared with the scores other trials had at that rung; a trial outside the top 1/eta stops there
(pruned, "screened out"), so a poor configuration costs its start-up and a slice of the trace
instead of the whole replay. Promotion costs nothing: the server is still up and the replay goes on.

Finalists: one run on a shared GPU is noisy, so the best configurations are measured again
`repeats` times on the same requests with re-timed arrivals (a different seed each time) and
reported as mean and 95% confidence interval (Student t).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.loadgen.metrics import RequestResult, summarize, wall_duration_s
from tuner.loadgen.replay import ProgressSnapshot
from tuner.loadgen.slo import SLO
from tuner.outcome import Outcome
from tuner.study.pruning import PruneDecision, SloPruner
from tuner.workload.request import TraceRequest

SCREENED_OUT = Outcome.SCREENED_OUT
DEFAULT_FRACTIONS = (0.25, 0.5, 1.0)
# two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


# ---- successive halving ---------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class RungScore:
    """Ordered: meeting the SLO beats missing it, then the higher value wins."""

    meets_slo: bool
    value: float


def rung_score(summary: dict[str, Any]) -> RungScore:
    """Goodput under the SLO when the study has one, else output throughput."""
    if summary.get("goodput") is not None:
        return RungScore(all((summary.get("slo_met") or {}).values()), float(summary["goodput"]))
    return RungScore(True, float(summary.get("output_throughput") or 0.0))


@dataclass
class SuccessiveHalving:
    """Which trials go on past each rung. Scores of past trials per rung are kept in `scores`
    (a trial's own scores go to its user attribute `rung_scores`; `from_study` rebuilds this)."""

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    eta: float = 2.0
    min_peers: int = 3  # below this many scores at a rung, everyone goes on
    scores: dict[int, list[RungScore]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or list(self.fractions) != sorted(
                self.fractions) or self.fractions[-1] != 1.0:
            raise ValueError(f"rung fractions must rise within (0, 1] and end at 1, got {self.fractions}")
        if self.eta <= 1:
            raise ValueError(f"eta must be > 1, got {self.eta}")

    def record(self, rung: int, score: RungScore) -> None:
        self.scores.setdefault(rung, []).append(score)

    @classmethod
    def from_study(cls, study, **options) -> SuccessiveHalving:
        """Rebuilt from the `rung_scores` user attribute of every trial (see `rung_scores_attr`)."""
        halving = cls(**options)
        for trial in study.get_trials(deepcopy=False):
            for rung, (meets_slo, value) in enumerate(trial.user_attrs.get("rung_scores", [])):
                halving.record(rung, RungScore(bool(meets_slo), float(value)))
        return halving

    def promote(self, rung: int, score: RungScore) -> bool:
        """Record `score` at `rung` and say whether the trial goes on (always at the last rung)."""
        peers = list(self.scores.get(rung, []))
        self.record(rung, score)
        if rung >= len(self.fractions) - 1 or len(peers) + 1 < self.min_peers:
            return True
        ranked = sorted([*peers, score], reverse=True)
        keep = max(1, math.ceil(len(ranked) / self.eta))
        return score >= ranked[keep - 1]


def rung_scores_attr(scores: Sequence[RungScore]) -> list[list]:
    """A trial's rung scores, in rung order, as a JSON-able user attribute."""
    return [[score.meets_slo, score.value] for score in scores]


def rung_windows(requests: Sequence[TraceRequest], fractions: Sequence[float]) -> list[int]:
    """For each rung, how many of the first requests (in arrival order) make up its window."""
    arrivals = [r.arrival_s for r in requests]
    if arrivals != sorted(arrivals):
        raise ValueError("requests must be in arrival order")
    start, span = arrivals[0], arrivals[-1] - arrivals[0]
    windows = []
    for fraction in fractions:
        count = len(arrivals) if fraction >= 1 else bisect_left(arrivals, start + fraction * span)
        windows.append(max(1, count))
    return windows


class RungWatch:
    """`on_progress`-shaped: scores each rung as soon as its window has finished, asks the
    successive-halving policy, and stops the replay when the trial is screened out.

    `rows` indices are positions in `requests`; `clock_scale` is the server clock's speed-up (as in
    `BenchConfig`)."""

    def __init__(self, halving: SuccessiveHalving, requests: Sequence[TraceRequest], slo: SLO | None,
                 clock_scale: float = 1.0) -> None:
        self.halving = halving
        self.windows = rung_windows(requests, halving.fractions)
        self.slo = slo
        self.clock_scale = clock_scale
        self.rung = 0  # next rung to score
        self.finished_in_window = [0] * len(self.windows)
        self.seen = 0
        self.scores: list[RungScore] = []
        self.summaries: list[dict[str, Any]] = []
        self.decision: PruneDecision | None = None

    def __call__(self, snapshot: ProgressSnapshot) -> bool:
        if snapshot.total != self.windows[-1]:  # the warm-up's replay, not the trial's
            return False
        rows = snapshot.rows
        for row in rows[self.seen:]:
            for k, size in enumerate(self.windows):
                if row.index < size:
                    self.finished_in_window[k] += 1
        self.seen = len(rows)
        while (self.decision is None and self.rung < len(self.windows) - 1
               and self.finished_in_window[self.rung] >= self.windows[self.rung]):
            score = self._score(rows)
            if not self.halving.promote(self.rung, score):
                size = self.windows[self.rung]
                self.decision = PruneDecision(
                    SCREENED_OUT, f"not in the top 1/{self.halving.eta:g} at rung {self.rung + 1} "
                                  f"(first {self.halving.fractions[self.rung]:.0%} of the trace, {size} requests): "
                                  f"goodput {score.value:.3g}{'' if score.meets_slo else ', SLO missed'}",
                    snapshot.completed + snapshot.failed, snapshot.elapsed_s)
            self.rung += 1
        return self.decision is not None

    def _score(self, rows) -> RungScore:
        window = [row for row in rows if row.index < self.windows[self.rung]]
        summary = summarize(window, wall_duration_s(window) * self.clock_scale, self.slo).to_dict()
        self.scores.append(rung_score(summary))
        self.summaries.append(summary)
        return self.scores[-1]

    def finish(self, rows: Sequence[RequestResult], summary: dict[str, Any]) -> None:
        """The replay ran to its end: score the rungs it passed between two progress calls (too late to
        stop it), then the whole replay (`summary`) as the last rung."""
        while self.rung < len(self.windows) - 1:
            self.halving.record(self.rung, self._score(rows))
            self.rung += 1
        score = rung_score(summary)
        self.halving.record(len(self.windows) - 1, score)
        self.scores.append(score)
        self.rung += 1

def stopped_constraints(slo: SLO, pruner: SloPruner | None, watch: RungWatch | None) -> dict[str, float]:
    """Optuna SLO constraint values (percentile - limit, ms) of a trial stopped early, so that the
    sampler still sees how far it was from the SLO: a trial screened out at a rung gets its window's
    own percentiles, one stopped by the pruner `SloPruner.constraint_values` (at least the proven
    lower bound for a lost target)."""
    from tuner.records.objectives import slo_constraints

    if watch is not None and watch.decision is not None and not (pruner is not None and pruner.decision):
        return dict(zip((t.name for t in slo.targets), slo_constraints(slo, watch.summaries[-1])))
    return pruner.constraint_values() if pruner is not None else {}


# ---- finalists -------------------------------------------------------------------------------

def retimed(requests: Sequence[TraceRequest], seed: int, mode: str = "jitter") -> list[TraceRequest]:
    """The same requests with new arrival times, deterministic given `seed`.

    `jitter`: every arrival moves by up to half the mean gap either way (bursts stay bursts);
    `poisson`: exponential gaps at the trace's mean rate (burstiness is lost)."""
    if mode not in ("jitter", "poisson"):
        raise ValueError(f"unknown re-timing mode {mode!r} (jitter, poisson)")
    if len(requests) < 2:
        return list(requests)
    rng = random.Random(seed)
    start = requests[0].arrival_s
    mean_gap = (requests[-1].arrival_s - start) / (len(requests) - 1)
    if mode == "poisson":
        times, now = [], start
        for _ in requests:
            times.append(now)
            now += rng.expovariate(1.0 / mean_gap) if mean_gap > 0 else 0.0
        return [dataclasses.replace(r, arrival_s=t) for r, t in zip(requests, times)]
    moved = [(max(start, r.arrival_s + rng.uniform(-0.5, 0.5) * mean_gap), i) for i, r in enumerate(requests)]
    moved.sort()
    return [dataclasses.replace(requests[i], arrival_s=t) for t, i in moved]


def t_quantile_95(dof: int) -> float:
    if dof < 1:
        return math.inf
    known = [d for d in _T95 if d <= dof]
    return _T95[max(known)] if dof < 60 else 1.96 if dof > 120 else _T95[60]


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # 95% confidence interval
    high: float
    values: tuple[float, ...]

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.half_width:.2g}"


def confidence_interval(values: Sequence[float]) -> Estimate:
    values = tuple(float(v) for v in values)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(mean, -math.inf, math.inf, values)
    half = t_quantile_95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Estimate(mean, mean - half, mean + half, values)


FINALIST_METRICS = ("output_throughput", "goodput", "p99_ttft_ms", "p99_tpot_ms", "median_ttft_ms")


@dataclass
class Remeasured:
    config: dict[str, Any]
    seeds: tuple[int, ...]
    summaries: list[dict[str, Any]]
    estimates: dict[str, Estimate]


def remeasure(config: dict[str, Any], measure: Callable[[list[TraceRequest]], dict[str, Any]],
              requests: Sequence[TraceRequest], repeats: int = 3, seed: int = 0, mode: str = "jitter",
              metrics: Sequence[str] = FINALIST_METRICS) -> Remeasured:
    """Run `measure(requests)` (a fresh trial of `config`: launch, replay, summary) `repeats` times,
    each with arrivals re-timed by another seed; mean and 95% CI of every metric present."""
    if repeats < 2:
        raise ValueError("a confidence interval needs at least 2 repeats (3 or more advised)")
    seeds = tuple(seed + i for i in range(repeats))
    summaries = [measure(retimed(requests, s, mode)) for s in seeds]
    return Remeasured(dict(config), seeds, summaries, estimates_of(summaries, metrics))


def estimates_of(summaries: Sequence[dict[str, Any]], metrics: Sequence[str] = FINALIST_METRICS
                 ) -> dict[str, Estimate]:
    """Mean and 95% CI of every metric that all `summaries` have."""
    estimates = {}
    for name in metrics:
        values = [s[name] for s in summaries if s.get(name) is not None]
        if values and len(values) == len(summaries):
            estimates[name] = confidence_interval(values)
    return estimates


def finalists(points: Sequence[Any], count: int = 3, key: Callable[[Any], float] | None = None) -> list[Any]:
    """The `count` best distinct configurations among `points` (objects with `.config` and
    `.summary`, e.g. `pareto.Point`), SLO-feasible first, by goodput or else throughput."""
    def default_key(point: Any) -> tuple:
        score = rung_score(point.summary)
        return (getattr(point, "feasible", True), score.meets_slo, score.value)

    chosen, seen = [], set()
    for point in sorted(points, key=key or default_key, reverse=True):
        signature = tuple(sorted((k, str(v)) for k, v in point.config.items()))
        if signature not in seen:
            seen.add(signature)
            chosen.append(point)
        if len(chosen) == count:
            break
    return chosen
