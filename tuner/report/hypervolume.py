"""Hypervolume of a 2-D front (throughput up, one latency down): the area it dominates up to a reference."""

from __future__ import annotations


def hypervolume_2d(front: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """`front` holds (throughput, latency) pairs; `reference` = (worst throughput, worst latency).

    The area of {(t, l): t >= ref_t, l <= ref_l, some point has throughput >= t and latency <= l}, in
    tok/s × ms. Points beyond the reference add nothing."""
    ref_throughput, ref_latency = reference
    pairs = sorted((lat, thr) for thr, lat in front if lat < ref_latency and thr > ref_throughput)
    area, best = 0.0, ref_throughput
    for i, (latency, throughput) in enumerate(pairs):
        best = max(best, throughput)
        next_latency = pairs[i + 1][0] if i + 1 < len(pairs) else ref_latency
        area += (next_latency - latency) * (best - ref_throughput)
    return area


def reference_latency(slo_limit_ms: float | None, latencies: list[float]) -> float:
    """The SLO limit of the metric where there is one, else 10% beyond the worst latency seen."""
    if slo_limit_ms is not None:
        return slo_limit_ms
    return 1.1 * max(latencies) if latencies else 1.0
