"""Per-request results and the run summary (definitions follow `vllm bench serve`; README: metrics).

Clocks: `scheduled_s`, `sent_s`, `finished_s` and `send_lag_s` describe the client and are wall-clock
seconds (the first three from the start of the replay). Latencies (`slot_wait_s`, `ttft_s`, `itl_s`,
`tpot_s`, `e2e_s`) and the summary's duration and throughputs read in the server's clock: with
`clock_scale` k (a simulator running k× faster than real time) they are the wall-clock figures × k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuner.loadgen.slo import SLO
from tuner.metrics import request_value_s


@dataclass(slots=True)
class RequestResult:
    index: int  # position in the replayed trace
    scheduled_s: float  # when it should have been sent (wall-clock, from replay start)
    sent_s: float  # when it was sent (wall-clock, from replay start)
    send_lag_s: float  # client lateness: sent - max(scheduled, slot acquired); wall-clock
    finished_s: float  # last byte or failure (wall-clock, from replay start)
    slot_wait_s: float = 0.0  # waiting for a --max-concurrency slot; not part of the latencies
    ttft_s: float | None = None  # send -> first chunk carrying generated text
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    tpot_s: float | None = None  # (e2e - ttft) / (output_tokens - 1), only when output_tokens > 1
    e2e_s: float | None = None  # send -> last byte
    prompt_tokens: int = 0
    output_tokens: int = 0
    requested_output_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens when reported
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class BenchSummary:
    completed: int
    failed: int
    duration_s: float  # first send -> last completion
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    p90_ttft_ms: float | None
    p99_ttft_ms: float | None
    max_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    p90_tpot_ms: float | None
    p99_tpot_ms: float | None
    max_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    p90_itl_ms: float | None
    p99_itl_ms: float | None
    max_itl_ms: float | None
    mean_e2e_ms: float | None
    median_e2e_ms: float | None
    p90_e2e_ms: float | None
    p99_e2e_ms: float | None
    max_e2e_ms: float | None
    p50_send_lag_ms: float | None
    p99_send_lag_ms: float | None
    max_send_lag_ms: float | None
    mean_slot_wait_ms: float | None
    p99_slot_wait_ms: float | None
    output_token_mismatches: int  # completed requests whose output length differs from the request
    cached_prompt_tokens: int | None  # sum of reported cached prompt tokens; None if never reported
    slo: str | None = None
    good_completed: int | None = None
    goodput: float | None = None  # good requests per second
    slo_met: dict[str, bool] = field(default_factory=dict)  # aggregate percentile within limit
    slo_value_ms: dict[str, float | None] = field(default_factory=dict)  # that percentile

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def to_server_clock(result: RequestResult, clock_scale: float) -> RequestResult:
    """Scale a wall-clock measurement into the server's clock (latencies × k; schedule untouched)."""
    if clock_scale == 1.0:
        return result
    k = clock_scale
    return dataclasses.replace(
        result,
        slot_wait_s=result.slot_wait_s * k,
        ttft_s=None if result.ttft_s is None else result.ttft_s * k,
        itl_s=[gap * k for gap in result.itl_s],
        tpot_s=None if result.tpot_s is None else result.tpot_s * k,
        e2e_s=None if result.e2e_s is None else result.e2e_s * k,
    )


def tpot_s(e2e_s: float, ttft_s: float, output_tokens: int) -> float | None:
    return (e2e_s - ttft_s) / (output_tokens - 1) if output_tokens > 1 else None


def wall_duration_s(rows: list[RequestResult]) -> float:
    """First send -> last completion, wall-clock."""
    if not rows:
        return 0.0
    return max(r.finished_s for r in rows) - min(r.sent_s for r in rows)


def _percentile_ms(values_s: list[float], percentile: float) -> float | None:
    return float(np.percentile(values_s, percentile)) * 1000.0 if values_s else None


def _stats_ms(name: str, values_s: list[float]) -> dict[str, float | None]:
    mean = float(np.mean(values_s)) * 1000.0 if values_s else None
    return {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": _percentile_ms(values_s, 50),
        f"p90_{name}_ms": _percentile_ms(values_s, 90),
        f"p99_{name}_ms": _percentile_ms(values_s, 99),
        f"max_{name}_ms": max(values_s) * 1000.0 if values_s else None,
    }


def summarize(rows: list[RequestResult], duration_s: float, slo: SLO | None = None) -> BenchSummary:
    """Summary of a run; failed requests are counted but left out of every latency figure."""
    ok = [r for r in rows if r.ok]
    per_second = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    series = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
    }
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    lags = [r.send_lag_s for r in rows]
    waits = [r.slot_wait_s for r in rows]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    latency: dict[str, Any] = {}  # mean_ttft_ms ... max_e2e_ms: field names made at run time
    for name, values in series.items():
        latency.update(_stats_ms(name, values))
    summary = BenchSummary(
        completed=len(ok),
        failed=len(rows) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(total_output),
        total_token_throughput=per_second(total_input + total_output),
        **latency,
        p50_send_lag_ms=_percentile_ms(lags, 50),
        p99_send_lag_ms=_percentile_ms(lags, 99),
        max_send_lag_ms=max(lags) * 1000.0 if lags else None,
        mean_slot_wait_ms=float(np.mean(waits)) * 1000.0 if waits else None,
        p99_slot_wait_ms=_percentile_ms(waits, 99),
        output_token_mismatches=sum(r.output_tokens != r.requested_output_tokens for r in ok),
        cached_prompt_tokens=sum(cached) if cached else None,
    )
    if slo is not None:
        good = sum(
            all(request_value_s(r, t.metric) * 1000.0 <= t.limit_ms for t in slo.targets) for r in ok
        )
        summary.slo = str(slo)
        summary.good_completed = good
        summary.goodput = per_second(good)
        for target in slo.targets:
            value = _percentile_ms(series[target.metric], target.percentile)
            summary.slo_value_ms[target.name] = value
            if value is None:  # no samples: met only if requests completed (e.g. one-token answers)
                summary.slo_met[target.name] = bool(ok)
            else:
                summary.slo_met[target.name] = value <= target.limit_ms
    return summary


ROW_COLUMNS = [f.name for f in dataclasses.fields(RequestResult)]


def csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(f"{v:.6f}" for v in value)
    if isinstance(value, float):
        return f"{value:.6f}"
    return value
