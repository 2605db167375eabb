"""Replay a trace through the simulated engine in-process (no HTTP, no clock): the metrics a real
replay would report, as a pure function of (configuration, trace).

Prompts are the load generator's own token ids (`token_ids_for`), so prefix-cache hits match what a
real replay of the same trace produces; metrics go through the load generator's `summarize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tuner.loadgen.metrics import (
    BenchSummary,
    RequestResult,
    summarize,
    tpot_s,
    wall_duration_s,
)
from tuner.loadgen.slo import SLO
from tuner.simulator.config import SimConfig
from tuner.simulator.engine import EngineStats, SimArrival, simulate
from tuner.simulator.schedulers import make_engine
from tuner.workload.prompts import token_ids_for
from tuner.workload.request import TraceRequest

# The metrics the simulator predicts, by the names a study's objectives use.
PREDICTED_METRICS = ("output_throughput", "ttft_p99", "tpot_p99")


@dataclass(frozen=True)
class OfflineResult:
    summary: BenchSummary
    stats: EngineStats

    def metrics(self) -> dict[str, float]:
        s = self.summary
        return {"output_throughput": s.output_throughput, "ttft_p99": s.p99_ttft_ms or 0.0,
                "tpot_p99": s.p99_tpot_ms or 0.0, "ttft_mean": s.mean_ttft_ms or 0.0,
                "tpot_mean": s.mean_tpot_ms or 0.0, "tpot_median": s.median_tpot_ms or 0.0,
                "ttft_median": s.median_ttft_ms or 0.0, "steps": float(self.stats.steps),
                **({"goodput": s.goodput} if s.goodput is not None else {})}


@lru_cache(maxsize=8)
def _arrivals(requests: tuple[TraceRequest, ...], vocab_size: int) -> tuple[SimArrival, ...]:
    return tuple(SimArrival(r.arrival_s, np.asarray(token_ids_for(r, i, vocab_size), dtype=np.int64),
                            max(1, r.output_tokens)) for i, r in enumerate(requests))


def replay(config: SimConfig, requests: Sequence[TraceRequest], slo: SLO | None = None) -> OfflineResult:
    """Open-loop replay at the trace's own times; raises `EngineStartupError` as the server would.
    With `slo`, the metrics include goodput (requests per second meeting every target)."""
    arrivals = _arrivals(tuple(requests), config.shape.vocab_size)
    report = simulate(config, arrivals, scheduler=make_engine)
    rows = []
    for index, result in enumerate(report.results):
        e2e, ttft = result.finish_s - result.start_s, result.first_token_s - result.start_s
        rows.append(RequestResult(index=index, scheduled_s=result.arrival_s,
                                  sent_s=result.start_s, send_lag_s=0.0, finished_s=result.finish_s, ttft_s=ttft,
                                  e2e_s=e2e, tpot_s=tpot_s(e2e, ttft, result.output_tokens),
                                  prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
                                  requested_output_tokens=result.output_tokens))
    return OfflineResult(summarize(rows, wall_duration_s(rows), slo), report.stats)
