"""What a workload looks like: size, rate, burstiness, token lengths, prefix reuse, in one pass.

Only numbers are kept while reading (typed arrays: arrival times, lengths, block ids), so a trace of
millions of requests is summarised without holding the requests themselves.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tuner.workload.request import TraceRequest


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of one kind (input or output) over all requests."""

    mean: float
    p50: float
    p90: float
    p99: float
    max: int


@dataclass(frozen=True)
class PrefixStats:
    """Reuse of prefix blocks: a block occurrence is reused when its id appeared earlier in the trace.

    `token_reuse` = tokens in reused block occurrences / all input tokens, where a reused occurrence
    counts `block_tokens` tokens, or fewer when it is a request's partial last block (so it never
    exceeds 1).
    """

    blocks_total: int
    blocks_unique: int
    block_reuse: float
    token_reuse: float


@dataclass(frozen=True)
class WorkloadStats:
    rows: int
    span_s: float
    mean_rate_rps: float | None  # rows / span; None when all requests arrive at one instant
    interarrival_cv: float | None  # std / mean of gaps between arrivals (1 for Poisson)
    dispersion_1s: float | None  # variance / mean of request counts in 1 s bins (1 for Poisson)
    input_tokens: LengthStats
    output_tokens: LengthStats
    prefix: PrefixStats | None  # None when no request lists prefix blocks
    sessions: int | None  # distinct session ids; None when no request has one
    requests_with_text: int  # requests carrying a prompt or messages


_INT64_WRAP = 1 << 64


def analyze(requests: Iterable[TraceRequest]) -> WorkloadStats:
    """Summarise requests in one streaming pass (arrival times must be non-decreasing)."""
    arrivals = array("d")
    inputs = array("q")
    outputs = array("q")
    block_ids = array("q")
    block_weights = array("q")  # tokens each block occurrence covers
    sessions: set[str] = set()
    with_text = 0
    for request in requests:
        arrivals.append(request.arrival_s)
        inputs.append(request.input_tokens)
        outputs.append(request.output_tokens)
        size = request.block_tokens
        for position, block_id in enumerate(request.prefix_blocks):
            block_ids.append(_as_int64(block_id))
            block_weights.append(max(0, min(size, request.input_tokens - position * size)))
        if request.session_id is not None:
            sessions.add(request.session_id)
        if request.prompt is not None or request.messages is not None:
            with_text += 1
    if not arrivals:
        raise ValueError("no requests to analyse")
    times = np.frombuffer(arrivals, dtype=np.float64)
    span = float(times[-1] - times[0])
    input_array = np.frombuffer(inputs, dtype=np.int64)
    return WorkloadStats(
        rows=len(times),
        span_s=span,
        mean_rate_rps=len(times) / span if span > 0 else None,
        interarrival_cv=_interarrival_cv(times),
        dispersion_1s=_dispersion(times),
        input_tokens=_length_stats(input_array),
        output_tokens=_length_stats(np.frombuffer(outputs, dtype=np.int64)),
        prefix=_prefix_stats(np.frombuffer(block_ids, dtype=np.int64),
                             np.frombuffer(block_weights, dtype=np.int64), int(input_array.sum())),
        sessions=len(sessions) if sessions else None,
        requests_with_text=with_text,
    )


def _as_int64(block_id: int) -> int:
    """`block_id` modulo 2**64 as an int64: unsigned 64-bit hashes stay distinct from one another."""
    if -(1 << 63) <= block_id < (1 << 63):
        return block_id
    return (block_id + (1 << 63)) % _INT64_WRAP - (1 << 63)


def _length_stats(values: np.ndarray) -> LengthStats:
    p50, p90, p99 = np.percentile(values, [50, 90, 99])  # linear interpolation between ranks
    return LengthStats(mean=float(values.mean()), p50=float(p50), p90=float(p90), p99=float(p99),
                       max=int(values.max()))


def _interarrival_cv(times: np.ndarray) -> float | None:
    gaps = np.diff(times)
    if len(gaps) == 0 or gaps.mean() <= 0:
        return None
    return float(gaps.std() / gaps.mean())


def _dispersion(times: np.ndarray) -> float | None:
    """Index of dispersion of counts in 1 s bins from the first arrival, the last bin partial."""
    if len(times) < 2:
        return None
    # from the non-empty bins only: a span of 1e30 s must not allocate a slot per second
    _, counts = np.unique(np.floor(times - times[0]), return_counts=True)
    bins = math.floor(times[-1] - times[0]) + 1  # empty bins count 0
    mean = len(times) / bins
    return float(np.sum(counts.astype(np.float64) ** 2) / bins - mean * mean) / mean


def _prefix_stats(ids: np.ndarray, weights: np.ndarray, input_tokens: int) -> PrefixStats | None:
    if len(ids) == 0:
        return None
    unique_ids, first_index = np.unique(ids, return_index=True)
    reused_tokens = int(weights.sum()) - int(weights[first_index].sum())
    reused_blocks = len(ids) - len(unique_ids)
    return PrefixStats(blocks_total=len(ids), blocks_unique=len(unique_ids),
                       block_reuse=reused_blocks / len(ids),
                       token_reuse=reused_tokens / input_tokens if input_tokens else 0.0)


def format_stats(stats: WorkloadStats) -> str:
    """A human-readable table of `stats`."""
    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    def lengths(s: LengthStats) -> str:
        return (f"mean {number(s.mean, 1)}  p50 {number(s.p50)}  p90 {number(s.p90)}  "
                f"p99 {number(s.p99)}  max {s.max:,}")

    rows = [
        ("requests", f"{stats.rows:,}"),
        ("time span", f"{number(stats.span_s, 1)} s"),
        ("mean rate", "-" if stats.mean_rate_rps is None else f"{stats.mean_rate_rps:.2f} req/s"),
        ("inter-arrival CV", number(stats.interarrival_cv, 2) + "  (1 = Poisson, higher = burstier)"),
        ("dispersion (1 s bins)", number(stats.dispersion_1s, 2) + "  (1 = Poisson)"),
        ("input tokens", lengths(stats.input_tokens)),
        ("output tokens", lengths(stats.output_tokens)),
    ]
    if stats.prefix is None:
        rows.append(("prefix reuse", "no prefix blocks in the trace"))
    else:
        p = stats.prefix
        rows.append(("prefix blocks", f"{p.blocks_total:,} total, {p.blocks_unique:,} distinct"))
        rows.append(("prefix reuse", f"{_percent(p.block_reuse)} of blocks repeat an earlier block; "
                                     f"{_percent(p.token_reuse)} of input tokens"))
    rows.append(("sessions", "-" if stats.sessions is None else f"{stats.sessions:,}"))
    rows.append(("prompt text", f"{stats.requests_with_text:,} of {stats.rows:,} requests "
                                "(the rest get synthetic prompts)"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if math.isfinite(fraction) else "-"
