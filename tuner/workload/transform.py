"""Lazy operations on request streams (slice, speed up), the one-call loader, and a trace digest."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from tuner.errors import InputError
from tuner.workload.formats import read_trace
from tuner.workload.request import TraceRequest


def first_rows(requests: Iterable[TraceRequest], n: int) -> Iterator[TraceRequest]:
    """The first `n` requests."""
    return itertools.islice(requests, n)


def first_seconds(requests: Iterable[TraceRequest], seconds: float) -> Iterator[TraceRequest]:
    """Requests arriving less than `seconds` after the first one; stops reading at the first later one."""
    end: float | None = None
    for request in requests:
        if end is None:
            end = request.arrival_s + seconds
        if request.arrival_s >= end:
            return
        yield request


def time_scaled(requests: Iterable[TraceRequest], k: float) -> Iterator[TraceRequest]:
    """Replay `k` times faster: every arrival time divided by `k`."""
    if not k > 0:
        raise InputError(f"must be positive, got {k}", field="time_scale")
    for request in requests:
        arrival = request.arrival_s / k
        if not math.isfinite(arrival):
            raise InputError(f"{k:g} is too small: an arrival at {request.arrival_s:g} s becomes {arrival} s",
                             field="time_scale")
        yield dataclasses.replace(request, arrival_s=arrival)


def rebased(requests: Iterable[TraceRequest]) -> Iterator[TraceRequest]:
    """Arrival times shifted so that the first request arrives at 0."""
    start: float | None = None
    for request in requests:
        if start is None:
            start = request.arrival_s
        yield request if start == 0 else dataclasses.replace(request,
                                                             arrival_s=request.arrival_s - start)


def selected(requests: Iterable[TraceRequest], rows: int | None = None,
             seconds: float | None = None, time_scale: float = 1.0) -> Iterator[TraceRequest]:
    """The selection the CLI options describe, lazily: rebased to start at 0, the first `seconds` of
    trace time (before scaling) and at most `rows` requests, replayed `time_scale` times faster."""
    if rows is not None and rows <= 0:
        raise InputError(f"must be a positive integer, got {rows}", field="rows")
    if seconds is not None and not seconds > 0:
        raise InputError(f"must be positive, got {seconds}", field="seconds")
    if not time_scale > 0:
        raise InputError(f"must be positive, got {time_scale}", field="time_scale")
    stream: Iterator[TraceRequest] = rebased(requests)
    if seconds is not None:
        stream = first_seconds(stream, seconds)
    if rows is not None:
        stream = first_rows(stream, rows)
    if time_scale != 1.0:
        stream = time_scaled(stream, time_scale)
    return stream


def load_workload(path: str | Path, fmt: str | None = None, rows: int | None = None,
                  seconds: float | None = None, time_scale: float = 1.0) -> list[TraceRequest]:
    """The requests to replay from a trace file, first arrival at 0 (see `selected`)."""
    return list(selected(read_trace(path, fmt), rows=rows, seconds=seconds, time_scale=time_scale))


def trace_digest(path: str | Path) -> str:
    """sha256 hex digest of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=str(path)) from None
    return digest.hexdigest()
