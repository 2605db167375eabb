"""The answer a study gives: one configuration, what it achieves, what it misses, and whether it is
better than the engine's defaults beyond noise.

It always answers while a trial completed. When no configuration meets every SLO percentile, the
recommendation is the best-goodput one and says which percentile it misses and by how much (and, with
a capacity search, the request rate at which the SLO would hold). "Better than the defaults" needs the
95 % confidence intervals of the re-measured runs (`finals`) to separate; otherwise the text says "no
significant improvement" with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.loadgen.slo import SLO
from tuner.metrics import METRICS, metric
from tuner.records.capacity import CapacityResult
from tuner.records.objectives import Objectives
from tuner.records.pareto import Point, pick


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    runs: int

    def __str__(self) -> str:
        half = (self.high - self.low) / 2
        return f"{self.mean:.3g} ± {half:.2g} ({self.runs} runs)"


@dataclass(frozen=True)
class VersusDefaults:
    metric: str
    best: Interval
    defaults: Interval
    significant: bool
    ratio: float

    def __str__(self) -> str:
        figures = f"{self.metric} {self.best} vs defaults {self.defaults} {metric(self.metric).unit}"
        if self.significant:
            return f"better than the defaults (95 % CIs separate, ×{self.ratio:.2f}): {figures}"
        return f"no significant improvement over the defaults (95 % CIs overlap): {figures}"


@dataclass(frozen=True)
class Recommendation:
    point: Point
    objective: str
    value: float | None
    meets_slo: bool
    misses: tuple[str, ...]  # "ttft_p99 4400 ms > limit 2000 ms (+120 %)"
    capacity: str  # "", or the capacity search's finding
    versus: VersusDefaults | None
    load_bound: bool  # the trace offered less load than the servers take
    changes_outputs: tuple[str, ...]

    def lines(self) -> list[str]:
        p = self.point
        value = "-" if self.value is None else f"{self.value:.4g} {metric(self.objective).unit}"
        head = (f"recommended: trial {p.number}{' (the defaults)' if p.baseline else ''}, {p.engine}, "
                f"{p.gpus} GPU(s): {self.objective} {value}")
        out = [head]
        if self.misses:
            out.append("no configuration met every SLO percentile; this one has the highest "
                       f"{self.objective} and misses " + "; ".join(self.misses))
        elif self.meets_slo and p.summary.get("slo"):
            out.append(f"meets the SLO ({p.summary['slo']})")
        if self.capacity:
            out.append(f"capacity: {self.capacity}")
        if self.versus is not None:
            out.append(str(self.versus))
        elif not p.baseline:
            out.append("not re-measured: one run each, so no claim against the defaults' noise "
                       "(use --finalists to measure again)")
        if p.unreliable:
            out.append("UNRELIABLE measurement: " + "; ".join(p.unreliable))
        if self.load_bound:
            out.append("the trace offers less load than these servers take (they finish at the offered rate): "
                       "ties were broken on GPUs and latency; replay faster (--time-scale) or use --capacity")
        if self.changes_outputs:
            out.append("CHANGES MODEL OUTPUTS: " + "; ".join(self.changes_outputs)
                       + " (--exclude output-changing keeps outputs exact)")
        return out


def _missed(slo: SLO | None, point: Point) -> tuple[str, ...]:
    if slo is None:
        return ()
    values = point.summary.get("slo_value_ms") or {}
    out = []
    for target in slo.targets:
        value = values.get(target.name)
        if value is None and target.name in METRICS:
            value = METRICS[target.name].value(point.summary)
        if value is None or value <= target.limit_ms:
            continue
        out.append(f"{target.name} {value:.0f} ms > limit {target.limit_ms:g} ms "
                   f"(+{(value / target.limit_ms - 1) * 100:.0f} %)")
    return tuple(out)


def _interval(final: dict[str, Any], key: str) -> Interval | None:
    estimate = ((final.get("remeasured") or {}).get("estimates") or {}).get(key)
    if not estimate:
        return None
    return Interval(estimate["mean"], estimate["low"], estimate["high"], len(estimate.get("values", ())))


def versus_defaults(best: Point, baseline: Point | None, finals: dict[int, dict[str, Any]],
                    slo: SLO | None) -> VersusDefaults | None:
    """Best against defaults on goodput (with an SLO) or output throughput, from re-measured runs."""
    if baseline is None or best.number == baseline.number:
        return None
    key = "goodput" if slo is not None else "output_throughput"
    a, b = _interval(finals.get(best.number, {}), key), _interval(finals.get(baseline.number, {}), key)
    if a is None or b is None:
        return None
    per_gpu_a, per_gpu_b = a.mean / max(1, best.gpus), b.mean / max(1, baseline.gpus)
    ratio = per_gpu_a / per_gpu_b if per_gpu_b else float("inf")
    significant = a.low / max(1, best.gpus) > b.high / max(1, baseline.gpus)
    return VersusDefaults(key + ("_per_gpu" if best.gpus != baseline.gpus else ""), a, b, significant, ratio)


def recommend(points: list[Point], objectives: Objectives, slo: SLO | None,
              finals: dict[int, dict[str, Any]] | None = None, offered_rate: float = 0.0,
              prefer: str = "throughput", changes_outputs: tuple[str, ...] = ()) -> Recommendation | None:
    best = pick(points, objectives, prefer, offered_rate)
    if best is None:
        return None
    finals = finals or {}
    baseline = next((p for p in points if p.baseline), None)
    capacity = (finals.get(best.number) or {}).get("capacity")
    return Recommendation(
        point=best, objective=objectives.primary, value=best.get(objectives.primary), meets_slo=best.feasible,
        misses=_missed(slo, best) if not best.feasible else (),
        capacity=f"the SLO holds up to {CapacityResult.from_attrs(capacity)}" if capacity else "",
        versus=versus_defaults(best, baseline, finals, slo), load_bound=best.load_bound(offered_rate),
        changes_outputs=changes_outputs)
