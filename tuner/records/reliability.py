"""Whether a measurement can decide anything: a client that fell behind did not offer the trace's load,
and a simulator whose clock fell behind wall-clock × its time scale stretched every latency."""

from __future__ import annotations

from typing import Any

SEND_LAG_P99_LIMIT_MS = 5.0  # a client later than this cannot be trusted to have offered the trace's load
SIM_CLOCK_LAG_LIMIT_S = 1.0  # simulated seconds the simulator's clock may fall behind wall-clock x scale


def unreliable_reasons(summary: dict[str, Any], engine_metrics: dict[str, float]) -> list[str]:
    """Why a measurement cannot decide a recommendation (empty: it can)."""
    reasons = []
    lag = summary.get("p99_send_lag_ms")
    if lag is not None and lag > SEND_LAG_P99_LIMIT_MS:
        reasons.append(f"client send lag p99 {lag:.1f} ms > {SEND_LAG_P99_LIMIT_MS:g} ms")
    clock = engine_metrics.get("clock_lag_max_seconds")
    if clock is not None and clock > SIM_CLOCK_LAG_LIMIT_S:
        reasons.append(f"simulator clock fell {clock:.2f} simulated s behind")
    return reasons
