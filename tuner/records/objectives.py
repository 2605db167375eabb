"""What a trial is scored on: throughput up, chosen latency percentiles down, SLOs as constraints."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuner.errors import InputError
from tuner.loadgen.slo import SLO

THROUGHPUT = "output_throughput"
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
PERCENTILES = ("mean", "p50", "p90", "p99", "max")
_LATENCY_RE = re.compile(r"^(ttft|tpot|itl|e2e)_(mean|p50|p90|p99|max)$")


def summary_key(metric: str) -> str:
    """`ttft_p99` -> the load generator's summary field for it."""
    match = _LATENCY_RE.match(metric)
    if not match:
        raise InputError(f"unknown latency metric '{metric}' (use e.g. ttft_p99, tpot_p90, e2e_mean)",
                         field="latency")
    name, stat = match.groups()
    return f"{'median' if stat == 'p50' else stat}_{name}_ms"


@dataclass(frozen=True)
class Objectives:
    latency: tuple[str, ...] = ("ttft_p99", "tpot_p99")

    @classmethod
    def parse(cls, text: str) -> "Objectives":
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        if not names:
            raise InputError("give at least one latency metric", field="latency")
        for name in names:
            summary_key(name)
        return cls(latency=names)

    @property
    def names(self) -> list[str]:
        return [THROUGHPUT, *self.latency]

    @property
    def directions(self) -> list[str]:
        return ["maximize", *["minimize"] * len(self.latency)]

    def values(self, summary: dict[str, Any]) -> list[float]:
        return [float(summary[THROUGHPUT]), *(float(summary[summary_key(m)]) for m in self.latency)]


def slo_constraints(slo: SLO | None, summary: dict[str, Any]) -> list[float]:
    """Optuna constraint values: <= 0 where the aggregate percentile meets its SLO limit."""
    if slo is None:
        return []
    values = []
    for target in slo.targets:
        measured = (summary.get("slo_value_ms") or {}).get(target.name)
        if measured is None:
            key = summary_key(target.name)
            if key not in summary:
                raise InputError(f"the study recorded no {target.name}; use p50, p90 or p99", field="slo")
            measured = summary[key]
        values.append(float("inf") if measured is None else float(measured) - target.limit_ms)
    return values
