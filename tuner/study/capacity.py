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
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class Probe:
    rate: float
    good_fraction: float
    holds: bool


@dataclass
class CapacityResult:
    capacity_rps: float | None  # highest rate that held; None when even `low` did not
    probes: list[Probe] = field(default_factory=list)
    at_least: bool = False  # `high` itself held: the capacity may be higher

    def __str__(self) -> str:
        if self.capacity_rps is None:
            return f"below {self.probes[0].rate:g} req/s"
        return f"{'>= ' if self.at_least else ''}{self.capacity_rps:.3g} req/s ({len(self.probes)} probes)"


def find_capacity(measure: Callable[[float], float], low: float, high: float, tolerance: float = 0.05,
                  attainment: float = 0.99, max_probes: int = 12) -> CapacityResult:
    """Bisection on the rate between `low` and `high` until the bracket is within `tolerance`
    (relative); returns the highest rate seen to hold. Assumes attainment falls as the rate rises."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    result = CapacityResult(None)

    def probe(rate: float) -> bool:
        fraction = measure(rate)
        holds = fraction >= attainment
        result.probes.append(Probe(rate, fraction, holds))
        return holds

    if not probe(low):
        return result
    result.capacity_rps = low
    if probe(high):
        result.capacity_rps, result.at_least = high, True
        return result
    good, bad = low, high
    while (bad - good) > tolerance * good and len(result.probes) < max_probes:
        middle = (good + bad) / 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    result.capacity_rps = good
    return result
