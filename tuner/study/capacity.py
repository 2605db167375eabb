"""Capacity of one configuration: the highest request rate it serves within the SLO, by bisection.

`measure(rate)` replays the trace's requests re-timed to a Poisson process at `rate` requests/s on a
running server (see `poisson_at_rate`) and returns the fraction of all requests that were good (met
every SLO target; failed and unfinished requests are not good). A rate *holds* when that fraction is
at least `attainment`. A replay stopped early because the SLO was already lost (`SloPruner`) simply
returns a low fraction, which is how pruning shortens the search: an overloaded probe is cut as soon
as it is certainly lost.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.loadgen.replay import chain, run_bench_sync
from tuner.loadgen.slo import SLO
from tuner.records.capacity import CapacityResult, Probe
from tuner.study.pruning import SloPruner
from tuner.workload.request import TraceRequest


def poisson_at_rate(requests: Sequence[TraceRequest], rate: float, seed: int = 0) -> list[TraceRequest]:
    """The same requests, in the same order, arriving as a Poisson process of `rate` requests/s from 0."""
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = random.Random(seed)
    now, out = 0.0, []
    for request in requests:
        out.append(dataclasses.replace(request, arrival_s=now))
        now += rng.expovariate(rate)
    return out


def good_fraction(summary: dict[str, Any], total_requests: int) -> float:
    """Requests that met every SLO target over all requests of the replay (a `BenchSummary` dict)."""
    good = summary.get("good_completed")
    if good is None:
        raise ValueError("the summary has no SLO figures: replay with an SLO")
    return good / total_requests if total_requests else 0.0


def find_capacity(measure: Callable[[float], float], low: float, high: float, tolerance: float = 0.05,
                  attainment: float = 0.99, max_probes: int = 12, start: float | None = None) -> CapacityResult:
    """Bisection on the rate until the bracket is within `tolerance` (relative); returns the highest rate
    seen to hold. The bracket is `low`..`high`, or, from `start`, found by doubling or halving the rate
    within them (cheaper when the capacity is near `start`). Assumes attainment falls as the rate rises."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    result = CapacityResult(None)

    def probe(rate: float) -> bool:
        fraction = measure(rate)
        holds = fraction >= attainment
        result.probes.append(Probe(rate, fraction, holds))
        return holds

    good: float | None = None
    bad: float | None = None
    if start is None:
        if not probe(low):
            return result
        good = low
        if not probe(high):
            bad = high
    else:
        rate = min(max(start, low), high)
        while len(result.probes) < max_probes:
            if probe(rate):
                good = rate
                if bad is not None or rate >= high:
                    break
                rate = min(high, rate * 2)
            else:
                bad = rate
                if good is not None or rate <= low:
                    break
                rate = max(low, rate / 2)
    if good is None:
        return result
    if bad is None:
        result.capacity_rps, result.at_least = good, True
        return result
    while (bad - good) > tolerance * good and len(result.probes) < max_probes:
        middle = (good + bad) / 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    result.capacity_rps = good
    return result


@dataclass
class CapacitySearch:
    """A trial's `measure` (see `TrialSpec`): the capacity search on one running server. Every probe replays
    the trial's requests as a Poisson process at the probed rate; a probe whose SLO is certainly lost stops
    early when that already decides it (`attainment` at or above the SLO's percentiles)."""

    slo: SLO
    start: float  # requests/s to probe first (the trace's own rate)
    attainment: float = 0.99
    tolerance: float = 0.05
    seed: int = 0
    spread: float = 16.0  # the search stays within start/spread .. start*spread

    def __call__(self, config, requests: Sequence[TraceRequest], hang) -> CapacityResult:
        prune = self.attainment >= max(t.percentile for t in self.slo.targets) / 100.0
        probe_config = config

        def measure(rate: float) -> float:
            nonlocal probe_config
            if hang.hung:  # the trial reports the hang; no probe holds on a server that stopped answering
                return 0.0
            at_rate = poisson_at_rate(requests, rate, self.seed)
            watchers = [hang, SloPruner(self.slo, len(at_rate))] if prune else [hang]
            result = run_bench_sync(probe_config, at_rate, on_progress=chain(*watchers))
            probe_config = dataclasses.replace(config, warmup_requests=0)  # warm after the first probe
            return good_fraction(result.summary.to_dict(), len(at_rate))

        return find_capacity(measure, self.start / self.spread, self.start * self.spread, self.tolerance,
                             self.attainment, start=self.start)
