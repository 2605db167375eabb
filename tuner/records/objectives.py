"""What a trial is scored on: any list of registered metrics (`tuner.metrics`), each maximised or
minimised as the registry says; SLOs as constraints.

Without an SLO the default is output throughput up, TTFT p99 and TPOT p99 down (a Pareto front).
With an SLO the default is goodput alone: the configuration that serves the most traffic within the
SLO. Throughput and goodput are per GPU when trials may use different numbers of GPUs (`--gpus` > 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.errors import InputError
from tuner.loadgen.slo import SLO
from tuner.metrics import GOODPUT, METRICS, THROUGHPUT, Direction, is_latency, metric

__all__ = ["GOODPUT", "THROUGHPUT", "Objectives", "default_objectives", "slo_constraints", "summary_key"]

DEFAULT_LATENCY = ("ttft_p99", "tpot_p99")


def summary_key(name: str) -> str:
    """`ttft_p99` -> the load generator's summary field for it."""
    if name not in METRICS:
        raise InputError(f"unknown metric '{name}' (use e.g. goodput, output_throughput, ttft_p99, tpot_p90, "
                         "e2e_mean)", field="objective")
    return metric(name).summary_key


@dataclass(frozen=True)
class Objectives:
    """The study's objectives, in order; Optuna's `directions` follow the registry."""

    names: tuple[str, ...] = (THROUGHPUT, *DEFAULT_LATENCY)

    def __post_init__(self) -> None:
        if not self.names:
            raise InputError("give at least one objective", field="objective")
        for name in self.names:
            summary_key(name)
        if len(set(self.names)) != len(self.names):
            raise InputError(f"an objective is named twice in {', '.join(self.names)}", field="objective")

    @classmethod
    def parse(cls, text: str) -> Objectives:
        return cls(tuple(part.strip() for part in text.split(",") if part.strip()))

    @classmethod
    def legacy(cls, latency: str) -> Objectives:
        """`--latency a,b`: throughput up and those latencies down (the round-1 form)."""
        names = tuple(part.strip() for part in latency.split(",") if part.strip())
        if not names or not all(is_latency(n) for n in names):
            raise InputError(f"'{latency}' is not a list of latency metrics (e.g. ttft_p99,tpot_p90)",
                             field="latency")
        return cls((THROUGHPUT, *names))

    @property
    def primary(self) -> str:
        return self.names[0]

    @property
    def needs_slo(self) -> bool:
        return any(n.startswith(GOODPUT) for n in self.names)

    @property
    def latency(self) -> tuple[str, ...]:
        """The latency objectives, or the default pair that fronts and tables show beside throughput."""
        return tuple(n for n in self.names if is_latency(n)) or DEFAULT_LATENCY

    @property
    def directions(self) -> list[Direction]:
        return [metric(n).direction for n in self.names]

    def values(self, summary: dict[str, Any], gpus: int = 1) -> list[float]:
        out = []
        for name in self.names:
            value = metric(name).value(summary, gpus)
            out.append(0.0 if value is None and metric(name).maximize else float("inf") if value is None
                       else value)
        return out


def default_objectives(slo: SLO | None, per_gpu: bool) -> Objectives:
    """Goodput with an SLO, else throughput and the default latencies; per GPU when trials may use different
    numbers of GPUs, so that a 2-GPU configuration is compared with a 1-GPU default fairly."""
    if slo is None:
        return Objectives(("output_throughput_per_gpu" if per_gpu else THROUGHPUT, *DEFAULT_LATENCY))
    return Objectives(("goodput_per_gpu",) if per_gpu else (GOODPUT,))


def slo_constraints(slo: SLO | None, summary: dict[str, Any]) -> list[float]:
    """Optuna constraint values: <= 0 where the aggregate percentile meets its SLO limit."""
    if slo is None:
        return []
    values = []
    for target in slo.targets:
        measured = (summary.get("slo_value_ms") or {}).get(target.name)
        if measured is None:
            name = target.name
            key = METRICS[name].summary_key if name in METRICS else None
            if key is None or key not in summary:
                raise InputError(f"the study recorded no {target.name}; use p50, p90 or p99", field="slo")
            measured = summary[key]
        values.append(float("inf") if measured is None else float(measured) - target.limit_ms)
    return values
