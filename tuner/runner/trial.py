"""One trial, start to finish: launch the server, replay the workload, scrape metrics, tear down."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.engines import get_engine
from tuner.engines.base import Launch, remove_key_file
from tuner.hardware.inventory import used_memory_mib, wait_memory_back
from tuner.loadgen.replay import BenchConfig, ReplayWatcher, chain, run_bench_sync, write_results
from tuner.loadgen.slo import SLO
from tuner.outcome import Outcome, missing_module
from tuner.runner.progress import PROGRESS_FILE, ProgressWriter
from tuner.runner.server import ForkServer, ManagedServer, ServerFailed, free_port
from tuner.space.knobs import SearchSpace
from tuner.workload.request import TraceRequest

MAX_FAILED_FRACTION = 0.5  # more failed requests than this fails the trial
EXIT_GRACE_S = 5.0  # a server whose engine died exits this soon after its requests failed


@dataclass
class TrialSpec:
    number: int
    engine: str
    space: SearchSpace
    launch: Launch
    requests: list[TraceRequest]
    out_dir: Path
    endpoint: str = "completions"
    concurrency: int | None = None
    max_concurrency: int | None = None
    warmup_requests: int = 2
    vocab_size: int = 32000
    slo: SLO | None = None
    startup_timeout_s: float = 600.0
    hang_timeout_s: float = 120.0  # no request finished for this long (server time) while the server lives
    request_timeout_s: float = 600.0
    # watchers that may stop the replay early; they come back in the outcome with their state
    watchers: list[ReplayWatcher] = field(default_factory=list)
    # instead of one replay, measure(bench_config, requests, hang_watch) on the live server (capacity search)
    measure: Callable | None = None
    label: str = ""  # tells apart runs of one trial number (finalist repeats, capacity search)
    fork_server: ForkServer | None = None  # fork the server from it when it preloads the engine (same machine)

    @property
    def run_name(self) -> str:
        return f"trial-{self.number:04d}" + (f"-{self.label}" if self.label else "")


@dataclass
class TrialOutcome:
    number: int
    ok: bool
    command: list[str]
    failure: str | None = None
    message: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    engine_metrics: dict[str, float] = field(default_factory=dict)
    log_tail: str = ""
    log_path: str = ""
    rows_csv: str = ""
    summary_json: str = ""
    ready_s: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    port_released: bool = True
    gpu_memory_released: bool | None = None  # None without NVML (no GPU)
    cuda_visible_devices: str = ""
    stopped: dict[str, Any] | None = None  # why a watcher stopped the replay early (the trial is pruned)
    watchers: list[ReplayWatcher] = field(default_factory=list)
    measured: Any = None  # what TrialSpec.measure returned
    startup_phases: dict[str, float] = field(default_factory=dict)  # seconds per start-up phase (server log)
    forked: bool = False  # the server was forked from a fork server that had preloaded the engine


def _scrape(url: str, api_key: str | None) -> str:
    request = urllib.request.Request(url + "/metrics")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class _HangWatch:
    """Stops the replay when no request finished for a while (a hung or stopped server)."""

    def __init__(self, limit_wall_s: float) -> None:
        self.limit_wall_s = limit_wall_s
        self.last_completed = -1
        self.last_change = time.monotonic()
        self.hung = False

    def __call__(self, snapshot) -> bool:
        done = snapshot.completed + snapshot.failed
        now = time.monotonic()
        if done != self.last_completed:
            self.last_completed, self.last_change = done, now
        elif snapshot.in_flight and now - self.last_change > self.limit_wall_s:
            self.hung = True
        return self.hung


def _wait_exit(server: ManagedServer, timeout_s: float) -> None:
    if server.process is None:
        return
    try:
        server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def scrub_secret(path: Path, secret: str | None) -> None:
    """Replace `secret` in a log file (engines print their arguments, an API key among them)."""
    if not secret or not path.exists():
        return
    needle, changed = secret.encode(), False
    scrubbed = path.with_name(path.name + ".scrub")
    with open(path, "rb") as source, open(scrubbed, "wb") as target:
        for line in source:
            if needle in line:
                line, changed = line.replace(needle, b"***"), True
            target.write(line)
    if changed:
        os.replace(scrubbed, path)
    else:
        scrubbed.unlink()


def execute_trial(spec: TrialSpec) -> TrialOutcome:
    engine = get_engine(spec.engine)
    port = free_port(spec.launch.host)
    launch = Launch(**{**spec.launch.__dict__, "port": port, "api_key": secrets.token_hex(24)})
    server_spec = engine.server_spec(launch, spec.space, vocab_size=spec.vocab_size)
    outcome = TrialOutcome(number=spec.number, ok=False, command=engine.serve_command(launch, spec.space),
                           started_at=time.time(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    trial_dir = spec.out_dir / spec.run_name
    server = ManagedServer(server_spec, trial_dir / "server.log", fork_server=spec.fork_server,
                           fork_wait_s=spec.startup_timeout_s / 2)
    outcome.log_path = str(server.log_path)
    hang = _HangWatch(spec.hang_timeout_s / server_spec.clock_scale)
    visible = [int(i) for i in outcome.cuda_visible_devices.split(",") if i.strip().isdigit()]
    memory_before = used_memory_mib(visible) if engine.needs_gpu else {}
    progress = ProgressWriter(trial_dir / PROGRESS_FILE, spec.number, spec.label, spec.slo, server_spec.clock_scale)
    try:
        progress.starting()
        server.start()
        outcome.forked = server.forked
        outcome.ready_s = server.wait_ready(spec.startup_timeout_s)
        outcome.startup_phases = engine.startup_phases(server.log_text(), server.started_at, outcome.ready_s)
        if outcome.startup_phases:
            (trial_dir / "startup_phases.json").write_text(json.dumps(outcome.startup_phases) + "\n")
        config = BenchConfig(url=server_spec.url, model=server_spec.served_model_name, endpoint=spec.endpoint,
                             api_key=server_spec.api_key, concurrency=spec.concurrency,
                             max_concurrency=spec.max_concurrency, clock_scale=server_spec.clock_scale,
                             vocab_size=spec.vocab_size, timeout_s=spec.request_timeout_s,
                             warmup_requests=spec.warmup_requests, slo=spec.slo)
        if spec.measure is not None:
            outcome.measured = spec.measure(config, spec.requests, hang)
            outcome.ok = not hang.hung and server.alive()
            if not outcome.ok:
                raise ServerFailed(Outcome.HANG if hang.hung else Outcome.CRASH,
                                   "the server stopped answering during the load search")
            return outcome
        result = run_bench_sync(config, spec.requests, on_progress=chain(hang, progress, *spec.watchers))
        outcome.watchers = spec.watchers
        decision = next((w.decision for w in spec.watchers if w.decision is not None), None)
        if result.stopped_early and decision is not None and not hang.hung:
            outcome.stopped = decision.as_attrs()
        if not hang.hung:  # a hung server would keep the scrape waiting for its timeout
            outcome.engine_metrics = engine.engine_metrics(_scrape(server_spec.url, server_spec.api_key))
        outcome.rows_csv, outcome.summary_json = (str(p) for p in write_results(result, trial_dir))
        outcome.summary = result.summary.to_dict()
        if not result.stopped_early:
            for watcher in spec.watchers:
                watcher.finish(result.rows, outcome.summary)
        failed = outcome.summary.get("failed", 0)
        total = failed + outcome.summary.get("completed", 0)
        requests_failed = (total == 0 and not outcome.stopped) or (total and failed / total > MAX_FAILED_FRACTION)
        if requests_failed and not hang.hung:
            _wait_exit(server, EXIT_GRACE_S)  # failed requests and a dying server: a crash, not bad requests
        if not server.alive():
            raise ServerFailed(Outcome.CRASH, f"server exited with code {server.returncode} "
                                              "during the replay")
        if hang.hung:
            raise ServerFailed(Outcome.HANG, f"no request finished for {spec.hang_timeout_s:.0f} s "
                                             "while the server was alive")
        if requests_failed:
            raise ServerFailed(Outcome.REQUEST_ERRORS, f"{failed} of {total} requests failed")
        outcome.ok = True
    except ServerFailed as exc:
        outcome.failure, outcome.message = exc.failure, exc.message
    finally:
        progress.done()
        exit_code = server.stop()
        scrub_secret(server.log_path, launch.api_key)
        remove_key_file(launch.api_key)
        outcome.port_released = server.wait_port_released(launch.host, port)
        if memory_before:
            outcome.gpu_memory_released = wait_memory_back(memory_before)
        outcome.log_tail = server.log_tail()
        outcome.ended_at = time.time()
    if not outcome.ok and outcome.failure in (Outcome.CRASH, Outcome.REQUEST_ERRORS):
        during_load = outcome.ready_s > 0
        classified = engine.classify_failure(exit_code, server.log_text())
        if classified != Outcome.CRASH:
            outcome.failure = classified
        if classified == Outcome.ENVIRONMENT:
            module = missing_module(server.log_text())
            outcome.message = (f"the engine's Python cannot import {module or 'a module'} (an incomplete install, "
                               f"not the configuration): {outcome.message}")
        if during_load and outcome.failure == Outcome.OOM_STARTUP:
            outcome.failure = Outcome.OOM_LOAD
    return outcome
