"""Stop a replay as soon as its trial is certainly lost: SLO out of reach, or beaten beyond doubt.

The replay calls `on_progress` with a `ProgressSnapshot` about once a second. `SloPruner` reads the
requests finished so far and decides from them alone, never from a guess about the rest:

- *SLO lost* (only once some trial of the study meets the SLO, `stop_on_slo_lost`; while none does,
  the recommendation is the best goodput whatever it misses, so losing a percentile stops nothing):
  for a target `ttft_p99=L` over N requests, the run's p99 (numpy's linear
  interpolation, over completed requests) ends above L whatever the unfinished requests do once
  `N' - floor((N' - 1) * 0.99)` completed requests are above L, where N' = N - failed is the most
  requests the percentile can be taken over. A trial that misses an SLO can never be recommended.
- *Dominated*: given the best goodput already measured (`best_goodput`, requests/s meeting every
  target) and the replay's scheduled span, a trial whose optimistic goodput (every unfinished request
  good, the replay ending on schedule) is below it cannot become the best. This bound is sound for
  open-loop replays: goodput = good requests / duration, and the duration is at least the scheduled
  span. The decision records the bound and the best it was compared with.

`snapshot.rows` only grows between calls (the replay appends finished requests), so the pruner reads
each row once. Snapshots of another replay (the warm-up, whose `total` differs) are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tuner.loadgen.metrics import RequestResult
from tuner.loadgen.replay import ProgressSnapshot
from tuner.loadgen.slo import SLO, SloTarget
from tuner.metrics import request_latency_s
from tuner.outcome import Outcome

SLO_LOST = Outcome.SLO_LOST
DOMINATED = Outcome.DOMINATED


@dataclass(frozen=True)
class PruneDecision:
    kind: str  # SLO_LOST, DOMINATED, or fidelity.SCREENED_OUT
    reason: str
    finished: int  # requests finished (completed + failed) when it was decided
    elapsed_s: float  # the snapshot's elapsed time (wall-clock, like the replay's)
    bound: float | None = None  # DOMINATED: the optimistic final goodput (req/s)
    best: float | None = None  # DOMINATED: the best final goodput it was compared with

    def as_attrs(self) -> dict:
        """What the lead stores on the Optuna trial (user attribute `stopped`)."""
        out = {"kind": self.kind, "reason": self.reason, "finished": self.finished,
               "elapsed_s": round(self.elapsed_s, 3)}
        if self.bound is not None:
            out.update(goodput_upper_bound=self.bound, best_goodput=self.best)
        return out


def violations_to_lose(total: int, percentile: float) -> int:
    """How many values above the limit make the `percentile` of `total` values exceed it for sure."""
    if total <= 0:
        return 1
    return total - math.floor((total - 1) * percentile / 100.0)


class SloPruner:
    """`on_progress`-shaped: `pruner(snapshot)` returns True to stop; `decision` says why."""

    def __init__(self, slo: SLO, total_requests: int, best_goodput: float | None = None,
                 span_s: float | None = None, stop_on_slo_lost: bool = True) -> None:
        self.slo = slo
        self.stop_on_slo_lost = stop_on_slo_lost
        self.total = total_requests
        self.best_goodput = best_goodput  # goodput to beat (requests/s), for the dominance rule
        self.span_s = span_s  # scheduled replay length in the server's clock: the shortest duration possible
        self.decision: PruneDecision | None = None
        self._reset()

    def _reset(self) -> None:
        self.over_limit = {target.name: 0 for target in self.slo.targets}
        self.values_ms: dict[str, list[float]] = {target.name: [] for target in self.slo.targets}
        self.failed = 0
        self.bad = 0  # failed, or completed with any target missed
        self.seen = 0

    def _read(self, rows) -> None:
        if len(rows) < self.seen:  # not the same replay: start over
            self._reset()
        for row in rows[self.seen:]:
            if not row.ok:
                self.failed += 1
                self.bad += 1
                continue
            missed = False
            for target in self.slo.targets:
                value = request_latency_s(row, target.metric)
                if value is not None:
                    self.values_ms[target.name].append(value * 1000.0)
                if value is not None and value * 1000.0 > target.limit_ms:
                    self.over_limit[target.name] += 1
                    missed = True
                elif value is None and target.metric != "tpot":  # no first token: never good
                    missed = True
            self.bad += missed
        self.seen = len(rows)

    def lost_target(self) -> tuple[SloTarget, int, int] | None:
        """The first target already out of reach: (target, requests over its limit, needed to lose)."""
        ceiling = self.total - self.failed
        for target in self.slo.targets:
            need = violations_to_lose(ceiling, target.percentile)
            if self.over_limit[target.name] >= need:
                return target, self.over_limit[target.name], need
        return None

    def optimistic_goodput(self) -> float | None:
        if not self.span_s or self.span_s <= 0:
            return None
        return (self.total - self.bad) / self.span_s

    def check(self, snapshot) -> PruneDecision | None:
        if snapshot.total != self.total:  # the warm-up's replay, not the trial's
            return None
        self._read(snapshot.rows)
        finished = snapshot.completed + snapshot.failed
        lost = self.lost_target() if self.stop_on_slo_lost else None
        if lost is not None:
            target, over, need = lost
            self.decision = PruneDecision(
                SLO_LOST, f"{target.name} cannot end within {target.limit_ms:g} ms: {over} of at most "
                          f"{self.total - self.failed} requests are already above it ({need} suffice)",
                finished, snapshot.elapsed_s)
            return self.decision
        bound = self.optimistic_goodput()
        if self.best_goodput is not None and bound is not None and bound < self.best_goodput:
            self.decision = PruneDecision(
                DOMINATED, f"goodput can reach at most {bound:.3g} req/s ({self.bad} of {self.total} requests "
                           f"already miss the SLO) < best {self.best_goodput:.3g} req/s",
                finished, snapshot.elapsed_s, bound=bound, best=self.best_goodput)
            return self.decision
        return None

    def __call__(self, snapshot: ProgressSnapshot) -> bool:
        return self.check(snapshot) is not None

    def finish(self, rows: Sequence[RequestResult], summary: dict) -> None:
        """A replay that ran to its end leaves nothing to decide (a ReplayWatcher)."""

    def percentile_lower_bound_ms(self, target: SloTarget) -> float | None:
        """The final percentile is at least this: the k-th largest value seen, k = violations needed to lose
        (the percentile's lower interpolation point has k values at or above it). None before k are seen."""
        need = violations_to_lose(self.total - self.failed, target.percentile)
        seen = self.values_ms[target.name]
        return sorted(seen, reverse=True)[need - 1] if len(seen) >= need else None

    def constraint_values(self) -> dict[str, float]:
        """Optuna constraint values (percentile - limit, ms, as `objectives.slo_constraints`) for a trial
        stopped early: a lost target gets at least its proven lower bound, every target the percentile of
        the requests finished so far where that is higher (an estimate, so that samplers still see how far
        each stopped trial was from the SLO)."""
        values = {}
        for target in self.slo.targets:
            seen = self.values_ms[target.name]
            estimate = float(np.percentile(seen, target.percentile)) if seen else -math.inf
            bound = self.percentile_lower_bound_ms(target) if self.over_limit[target.name] else None
            values[target.name] = max(estimate, bound if bound is not None else -math.inf) - target.limit_ms
            if not math.isfinite(values[target.name]):
                values[target.name] = 0.0
        return values

