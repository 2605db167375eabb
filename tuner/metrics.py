"""The one registry of what a run is measured on: each metric's name, unit, direction, where the run
summary keeps it, and (for latencies) its value per request.

Objectives (`tuner.records.objectives`), SLO targets (`tuner.loadgen.slo`), early stopping
(`tuner.study.pruning`), the summary (`tuner.loadgen.metrics`) and the reports read metrics from here.
Latency metrics are `<kind>_<stat>`: kind ttft|tpot|itl|e2e, stat mean|p50|p90|p99|max.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

Direction = Literal["maximize", "minimize"]  # Optuna's names
MAXIMIZE: Final = "maximize"
MINIMIZE: Final = "minimize"
LATENCY_KINDS = ("ttft", "tpot", "itl", "e2e")
PER_REQUEST_KINDS = ("ttft", "tpot", "e2e")  # one value per request: what an SLO target can bound
LATENCY_STATS = ("mean", "p50", "p90", "p99", "max")
_LATENCY = re.compile(r"^(ttft|tpot|itl|e2e)_(mean|p50|p90|p99|max)$")


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    direction: Direction  # MAXIMIZE or MINIMIZE
    summary_key: str  # the run summary's field (`BenchSummary`)
    description: str
    per_gpu: bool = False  # the summary's figure divided by the trial's GPUs

    @property
    def maximize(self) -> bool:
        return self.direction == MAXIMIZE

    def value(self, summary: Mapping[str, Any], gpus: int = 1) -> float | None:
        raw = summary.get(self.summary_key)
        if raw is None:
            return None
        return float(raw) / max(1, gpus) if self.per_gpu else float(raw)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b


def _latency(kind: str, stat: str) -> Metric:
    key = f"{'median' if stat == 'p50' else stat}_{kind}_ms"
    return Metric(f"{kind}_{stat}", "ms", MINIMIZE, key, f"{stat} of {kind.upper()} over completed requests")


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("goodput", "req/s", MAXIMIZE, "goodput", "requests per second meeting every SLO target"),
    Metric("goodput_per_gpu", "req/s/GPU", MAXIMIZE, "goodput", "goodput divided by the trial's GPUs",
           per_gpu=True),
    Metric("output_throughput", "tok/s", MAXIMIZE, "output_throughput", "generated tokens per second"),
    Metric("output_throughput_per_gpu", "tok/s/GPU", MAXIMIZE, "output_throughput",
           "output throughput divided by the trial's GPUs", per_gpu=True),
    Metric("request_throughput", "req/s", MAXIMIZE, "request_throughput", "completed requests per second"),
    *(_latency(kind, stat) for kind in LATENCY_KINDS for stat in LATENCY_STATS),
)}
THROUGHPUT = "output_throughput"
GOODPUT = "goodput"


def metric(name: str) -> Metric:
    """The registered metric `name`; KeyError names the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric '{name}' (known: {', '.join(METRICS)})") from None


def is_latency(name: str) -> bool:
    return bool(_LATENCY.match(name))


def request_latency_s(row: Any, kind: str) -> float | None:
    """A request's own TTFT, TPOT or E2E in seconds (None where it has none)."""
    return {"ttft": row.ttft_s, "tpot": row.tpot_s, "e2e": row.e2e_s}[kind]


def request_value_s(row: Any, kind: str) -> float:
    """A request's own value of a latency kind, for goodput (vLLM's `--goodput` rules): no first token
    or no end means never good; a one-token answer has no decode, so its TPOT meets any limit."""
    value = request_latency_s(row, kind)
    if value is None:
        return 0.0 if kind == "tpot" else float("inf")
    return float(value)
