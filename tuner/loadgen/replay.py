"""Replay a trace against a server: open loop at the trace's arrival times, or closed loop with N workers.

Open loop: one scheduler coroutine sleeps until each arrival (coarse sleep, then a short yield-spin
for the last ~1.5 ms) and launches the request as its own task; it never waits for a response, so a
slow server cannot slow the offered load. With `max_concurrency` a launched request waits for a slot;
that wait is recorded as `slot_wait_s` and is not part of its TTFT/E2E (as in `vllm bench serve`).
Closed loop: `concurrency` workers, each sending the next request as soon as its previous one ends.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import inspect
import itertools
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp
import numpy as np

from tuner.errors import InputError
from tuner.loadgen.client import (
    ENDPOINT_PATHS,
    build_payload,
    encode_body,
    fetch_first_model,
    request_headers,
    stream_request,
)
from tuner.loadgen.metrics import (
    ROW_COLUMNS,
    BenchSummary,
    RequestResult,
    csv_cell,
    summarize,
    to_server_clock,
    tpot_s,
    wall_duration_s,
)
from tuner.loadgen.slo import SLO
from tuner.workload.request import TraceRequest

SPIN_WINDOW_S = 0.0015  # wake this early from asyncio.sleep, then yield-spin to the exact time
PREPARE_SLACK_S = 0.01  # build bodies ahead only while the next send is at least this far off
PREFILL_S = 1.0  # bodies of the first second of the replay are built before the clock starts
LOOKAHEAD_BYTES = 64 << 20  # at most this much of built, unsent request bodies
WARMUP_SEED_OFFSET = 7919  # warmup prompts use another seed so they share no cache with the run


@dataclass
class BenchConfig:
    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str | None = None  # None -> first id from GET /v1/models
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None  # sent as Authorization: Bearer
    concurrency: int | None = None  # closed loop with this many in flight; None -> open loop
    max_concurrency: int | None = None  # open loop cap; the slot wait is not counted in latency
    time_scale: float = 1.0  # replay the trace k× faster (arrivals / k)
    clock_scale: float = 1.0  # server clock runs k× wall-clock: arrivals / k, durations × k
    vocab_size: int = 32000  # token ids of synthesized prompts are drawn below this
    seed: int = 0
    timeout_s: float = 600.0  # per request
    warmup_requests: int = 0  # sent first, excluded from results
    slo: SLO | None = None
    progress_interval_s: float = 1.0  # how often on_progress is called

    def validate(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise InputError(f"'{self.endpoint}' is not one of {', '.join(ENDPOINT_PATHS)}",
                             field="endpoint")
        for name in ("concurrency", "max_concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"must be at least 1, got {value}", field=name)
        for name in ("time_scale", "clock_scale", "timeout_s", "progress_interval_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be positive, got {getattr(self, name)}", field=name)
        if self.vocab_size < 2:
            raise InputError(f"must be at least 2, got {self.vocab_size}", field="vocab_size")
        if self.warmup_requests < 0:
            raise InputError(f"must be >= 0, got {self.warmup_requests}", field="warmup_requests")


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    elapsed_s: float  # wall-clock since the replay started
    total: int
    sent: int
    completed: int
    failed: int
    in_flight: int
    p50_ttft_ms: float | None  # running percentiles over completed requests, server clock
    p99_ttft_ms: float | None
    p50_tpot_ms: float | None
    p99_tpot_ms: float | None
    p99_e2e_ms: float | None
    rows: tuple[RequestResult, ...]  # finished so far (completed and failed)


@dataclass
class BenchResult:
    rows: list[RequestResult]
    summary: BenchSummary
    stopped_early: bool = False
    not_finished: int = 0  # requests never sent or cancelled in flight by an early stop
    model: str = ""
    config: BenchConfig | None = None

    def run_info(self) -> dict:
        info: dict = {"stopped_early": self.stopped_early, "not_finished": self.not_finished,
                      "model": self.model}
        if self.config is not None:
            c = self.config
            info.update(url=c.url, endpoint=c.endpoint,
                        mode="closed" if c.concurrency else "open", concurrency=c.concurrency,
                        max_concurrency=c.max_concurrency, time_scale=c.time_scale,
                        clock_scale=c.clock_scale, seed=c.seed)
        return info


ProgressCallback = Callable[[ProgressSnapshot], "Awaitable[bool] | bool"]


class StopDecision(Protocol):
    def as_attrs(self) -> dict[str, Any]:
        """What the trial records about why it was stopped (kind, reason, when)."""


@runtime_checkable
class ReplayWatcher(Protocol):
    """A trial's replay watcher (tuner.study.pruning.SloPruner, tuner.study.fidelity.RungWatch).

    The replay calls it with each progress snapshot (about once a second); True stops the replay,
    and `decision` then says why. After a replay that ran to its end, `finish` gets every row and the
    summary (too late to stop anything, in time to learn from it)."""

    @property
    def decision(self) -> StopDecision | None: ...

    def __call__(self, snapshot: ProgressSnapshot) -> bool: ...

    def finish(self, rows: Sequence[RequestResult], summary: dict[str, Any]) -> None: ...


def _percentiles(values_ms: list[float]) -> tuple[float | None, float | None]:
    """p50 and p99."""
    if not values_ms:
        return None, None
    p50, p99 = np.percentile(values_ms, [50, 99])
    return float(p50), float(p99)


class _Replay:
    def __init__(self, config: BenchConfig, requests: list[TraceRequest], model: str,
                 session: aiohttp.ClientSession, on_progress: ProgressCallback | None) -> None:
        self.config = config
        self.requests = requests
        self.model = model
        self.session = session
        self.on_progress = on_progress
        self.url = config.url.rstrip("/") + ENDPOINT_PATHS[config.endpoint]
        self.headers = request_headers(config.api_key)
        self.rows: list[RequestResult] = []
        self.running_ms: dict[str, list[float]] = {"ttft": [], "tpot": [], "e2e": []}  # completed
        self.tasks: set[asyncio.Task] = set()
        self.sent = 0
        self.in_flight = 0
        self.stop = asyncio.Event()
        self.t0 = 0.0
        # open loop: request indices in arrival order and the bodies built ahead of their send time
        self.order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        self.first_arrival = requests[self.order[0]].arrival_s
        self.next_pos = 0
        self.upcoming: deque[tuple[int, float, bytes]] = deque()
        self.upcoming_bytes = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def body(self, index: int, request: TraceRequest) -> bytes:
        c = self.config
        return encode_body(build_payload(c.endpoint, self.model, request, index, c.vocab_size, c.seed))

    async def run(self) -> bool:
        """Replay everything; True if on_progress stopped it early."""
        if not self.config.concurrency:
            self._prefill()
        self.t0 = time.perf_counter()
        drive = asyncio.ensure_future(self._closed_loop() if self.config.concurrency
                                      else self._open_loop())
        stopped = asyncio.ensure_future(self.stop.wait())
        progress = asyncio.ensure_future(self._report_progress()) if self.on_progress else None
        try:
            await asyncio.wait({drive, stopped, *([progress] if progress else [])},
                               return_when=asyncio.FIRST_COMPLETED)
            if drive.done():
                drive.result()  # re-raise a bug rather than hide it
                return False
            for task in (drive, *self.tasks):
                task.cancel()
            await asyncio.gather(drive, *self.tasks, return_exceptions=True)
            error = progress.exception() if progress is not None and progress.done() else None
            if error is not None:
                raise error  # on_progress itself failed
            return True
        finally:
            for waiter in (stopped, progress):
                if waiter is not None:
                    waiter.cancel()
            await asyncio.gather(stopped, *(t for t in [progress] if t), return_exceptions=True)

    async def _sleep_until(self, target_s: float) -> None:
        while (remaining := target_s - self.now()) > 0:
            await asyncio.sleep(remaining - SPIN_WINDOW_S if remaining > 2 * SPIN_WINDOW_S else 0)

    def _scheduled_s(self, index: int) -> float:
        c = self.config
        return (self.requests[index].arrival_s - self.first_arrival) / (c.time_scale * c.clock_scale)

    def _prepare_next(self) -> bool:
        """Build the body of the next request in arrival order; False when all are built."""
        if self.next_pos >= len(self.order):
            return False
        index = self.order[self.next_pos]
        self.next_pos += 1
        body = self.body(index, self.requests[index])
        self.upcoming.append((index, self._scheduled_s(index), body))
        self.upcoming_bytes += len(body)
        return True

    def _prefill(self) -> None:
        """Bodies of the first PREFILL_S of the replay, built before the clock starts."""
        while (self.next_pos < len(self.order) and self.upcoming_bytes < LOOKAHEAD_BYTES
               and self._scheduled_s(self.order[self.next_pos]) < PREFILL_S):
            self._prepare_next()

    async def _open_loop(self) -> None:
        c = self.config
        slots = asyncio.Semaphore(c.max_concurrency) if c.max_concurrency else None
        while self.upcoming or self._prepare_next():
            index, scheduled, body = self.upcoming[0]
            # spare time before the next send goes to building later bodies (bursts send at once)
            while (self.now() < scheduled - PREPARE_SLACK_S and self.upcoming_bytes < LOOKAHEAD_BYTES
                   and self._prepare_next()):
                await asyncio.sleep(0)  # let responses be read between builds
            await self._sleep_until(scheduled)
            self.upcoming.popleft()
            self.upcoming_bytes -= len(body)
            request = self.requests[index]
            task = asyncio.ensure_future(self._send(index, request, body, scheduled, slots))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(0)  # the task sends now, before the next one is launched
        while self.tasks:
            await asyncio.gather(*self.tasks)

    async def _closed_loop(self) -> None:
        pending = iter(enumerate(self.requests))
        workers = min(self.config.concurrency or 1, len(self.requests))
        await asyncio.gather(*(self._worker(pending) for _ in range(workers)))

    async def _worker(self, pending: Iterator[tuple[int, TraceRequest]]) -> None:
        for index, request in pending:
            body = self.body(index, request)
            await self._send(index, request, body, self.now(), None)

    async def _send(self, index: int, request: TraceRequest, body: bytes, scheduled_s: float,
                    slots: asyncio.Semaphore | None) -> None:
        slot_wait = 0.0
        if slots is not None:
            asked = self.now()
            await slots.acquire()
            slot_wait = self.now() - asked
        self.sent += 1
        self.in_flight += 1
        try:
            outcome = await stream_request(self.session, self.url, body,
                                           chat=self.config.endpoint == "chat",
                                           headers=self.headers, timeout_s=self.config.timeout_s)
        finally:
            self.in_flight -= 1
            if slots is not None:
                slots.release()
        sent_s = outcome.sent_at - self.t0
        tpot = None
        if outcome.e2e_s is not None and outcome.ttft_s is not None:
            tpot = tpot_s(outcome.e2e_s, outcome.ttft_s, outcome.output_tokens)
        row = RequestResult(
            index=index,
            scheduled_s=scheduled_s,
            sent_s=sent_s,
            send_lag_s=max(0.0, sent_s - scheduled_s - slot_wait),
            finished_s=outcome.finished_at - self.t0,
            slot_wait_s=slot_wait,
            ttft_s=outcome.ttft_s,
            itl_s=outcome.itl_s,
            tpot_s=tpot,
            e2e_s=outcome.e2e_s,
            prompt_tokens=(outcome.prompt_tokens if outcome.prompt_tokens is not None
                           else request.input_tokens),
            output_tokens=outcome.output_tokens,
            requested_output_tokens=max(1, request.output_tokens),
            cached_tokens=outcome.cached_tokens,
            error=outcome.error,
        )
        row = to_server_clock(row, self.config.clock_scale)
        self.rows.append(row)
        if row.ok:
            for name, value in (("ttft", row.ttft_s), ("tpot", row.tpot_s), ("e2e", row.e2e_s)):
                if value is not None:
                    self.running_ms[name].append(value * 1000.0)

    def snapshot(self) -> ProgressSnapshot:
        completed = len(self.running_ms["e2e"])
        ttft = _percentiles(self.running_ms["ttft"])
        tpot = _percentiles(self.running_ms["tpot"])
        return ProgressSnapshot(
            elapsed_s=self.now(), total=len(self.requests), sent=self.sent, completed=completed,
            failed=len(self.rows) - completed, in_flight=self.in_flight,
            p50_ttft_ms=ttft[0], p99_ttft_ms=ttft[1], p50_tpot_ms=tpot[0], p99_tpot_ms=tpot[1],
            p99_e2e_ms=_percentiles(self.running_ms["e2e"])[1], rows=tuple(self.rows))

    async def _report_progress(self) -> None:
        assert self.on_progress is not None
        while True:
            await asyncio.sleep(self.config.progress_interval_s)
            verdict = self.on_progress(self.snapshot())
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if verdict:
                self.stop.set()
                return


def _warmup_requests(config: BenchConfig, requests: list[TraceRequest]) -> list[TraceRequest]:
    """Same lengths as the first requests, no shared prefixes (they use another seed too)."""
    return [TraceRequest(arrival_s=0.0, input_tokens=r.input_tokens, output_tokens=r.output_tokens)
            for r in itertools.islice(itertools.cycle(requests), config.warmup_requests)]


async def _warm_up(config: BenchConfig, requests: list[TraceRequest], model: str,
                   session: aiohttp.ClientSession, on_progress: ProgressCallback | None) -> None:
    warm_config = dataclasses.replace(
        config, seed=config.seed + WARMUP_SEED_OFFSET, warmup_requests=0,
        concurrency=config.concurrency or config.max_concurrency or config.warmup_requests)
    await _Replay(warm_config, _warmup_requests(config, requests), model, session, on_progress).run()


async def run_bench(config: BenchConfig, requests: list[TraceRequest],
                    on_progress: ProgressCallback | None = None) -> BenchResult:
    """Replay `requests` against `config.url` and summarize (see module docstring)."""
    config.validate()
    if not requests:
        raise InputError("the workload has no requests", field="workload")
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        model = config.model or await fetch_first_model(session, config.url,
                                                        request_headers(config.api_key))
        if config.warmup_requests:
            await _warm_up(config, requests, model, session, on_progress)  # a hang watch covers it too
        replay = _Replay(config, requests, model, session, on_progress)
        stopped_early = await replay.run()
    rows = sorted(replay.rows, key=lambda r: r.index)
    summary = summarize(rows, wall_duration_s(rows) * config.clock_scale, config.slo)
    return BenchResult(rows=rows, summary=summary, stopped_early=stopped_early,
                       not_finished=len(requests) - len(rows), model=model, config=config)


def chain(*watchers: ProgressCallback) -> Callable[[ProgressSnapshot], bool]:
    """One `on_progress` from several (synchronous ones): stops when any says stop; each sees every snapshot."""
    def on_progress(snapshot: ProgressSnapshot) -> bool:
        return any([bool(watch(snapshot)) for watch in watchers])
    return on_progress


def run_bench_sync(config: BenchConfig, requests: list[TraceRequest],
                   on_progress: ProgressCallback | None = None) -> BenchResult:
    return asyncio.run(run_bench(config, requests, on_progress))


def write_results(result: BenchResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `requests.csv` (one row per request, itl_s space-separated) and `summary.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "requests.csv"
    with rows_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ROW_COLUMNS)
        for row in sorted(result.rows, key=lambda r: r.index):
            writer.writerow([csv_cell(getattr(row, name)) for name in ROW_COLUMNS])
    summary_path = out / "summary.json"
    document = {**result.summary.to_dict(), **result.run_info()}
    summary_path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return rows_path, summary_path
