"""Live progress of running trials: each trial (in its Ray actor) writes `progress.json` in its run folder;
the lead process reads those files and shows one line per running trial, redrawn in place on a terminal,
plain lines every `plain_every_s` otherwise. A file, not a Ray channel: it also survives a lead restart and
needs nothing from the actor but the run folder (on a cluster without a shared folder, nothing shows)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from tuner.loadgen.slo import SLO

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class Progress:
    number: int
    label: str
    phase: str  # "starting" (server launching), "measuring", "done"
    done: int = 0  # requests finished (completed and failed)
    total: int = 0
    failed: int = 0
    p99_ttft_ms: float | None = None
    p99_tpot_ms: float | None = None
    goodput: float | None = None  # requests/s meeting the SLO so far (server clock); None without an SLO
    elapsed_s: float = 0.0  # of the replay, wall-clock
    updated_at: float = 0.0  # epoch seconds

    def line(self) -> str:
        name = f"trial {self.number}" + (f" {self.label}" if self.label else "")
        if self.phase == "starting":
            return f"  {name}: starting the server"
        parts = [f"{self.done}/{self.total} requests"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.p99_ttft_ms is not None:
            parts.append(f"TTFT p99 {self.p99_ttft_ms:.0f} ms")
        if self.p99_tpot_ms is not None:
            parts.append(f"TPOT p99 {self.p99_tpot_ms:.1f} ms")
        if self.goodput is not None:
            parts.append(f"goodput {self.goodput:.2f} req/s")
        return f"  {name}: " + ", ".join(parts) + f" ({self.elapsed_s:.0f} s)"


def _write(path: Path, progress: Progress) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(progress)))
    os.replace(tmp, path)  # a reader never sees half a file


class ProgressWriter:
    """A replay watcher (never stops it) that writes the trial's progress at most every `every_s`."""

    def __init__(self, path: Path, number: int, label: str = "", slo: SLO | None = None,
                 clock_scale: float = 1.0, every_s: float = 1.0) -> None:
        self.path, self.number, self.label, self.slo = path, number, label, slo
        self.clock_scale, self.every_s = clock_scale, every_s
        self.last = -math.inf

    def starting(self) -> None:
        _write(self.path, Progress(self.number, self.label, "starting", updated_at=time.time()))

    def done(self) -> None:
        self.path.unlink(missing_ok=True)

    def __call__(self, snapshot) -> bool:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return False
        self.last = now
        goodput = None
        if self.slo is not None and snapshot.elapsed_s > 0:
            good = sum(row.error is None and all(_value_ms(row, t.metric) <= t.limit_ms for t in self.slo.targets)
                       for row in snapshot.rows)
            goodput = good / (snapshot.elapsed_s * self.clock_scale)
        _write(self.path, Progress(
            self.number, self.label, "measuring", done=snapshot.completed + snapshot.failed, total=snapshot.total,
            failed=snapshot.failed, p99_ttft_ms=snapshot.p99_ttft_ms, p99_tpot_ms=snapshot.p99_tpot_ms,
            goodput=goodput, elapsed_s=snapshot.elapsed_s, updated_at=time.time()))
        return False


def _value_ms(row, metric: str) -> float:
    value = {"ttft": row.ttft_s, "tpot": row.tpot_s, "e2e": row.e2e_s}[metric]
    if value is None:
        return 0.0 if metric == "tpot" else math.inf  # one-token answers have no decode
    return value * 1000.0


def read_progress(path: Path) -> Progress | None:
    try:
        return Progress(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class LiveLines:
    """One line per running trial on `stream`: redrawn in place on a TTY, else printed every `plain_every_s`.
    `clear()` before anything else is printed, so the lines never mix with it."""

    def __init__(self, stream: TextIO | None = None, plain_every_s: float = 30.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_every_s = plain_every_s
        self.drawn = 0  # lines on screen now (TTY)
        self.last_plain = time.monotonic()

    def show(self, trial_dirs: list[Path]) -> None:
        lines = [p.line() for p in (read_progress(d / PROGRESS_FILE) for d in trial_dirs) if p is not None]
        if self.tty:
            self.clear()
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.drawn = len(lines)
        elif lines and time.monotonic() - self.last_plain >= self.plain_every_s:
            self.stream.write("\n".join(lines) + "\n")
            self.last_plain = time.monotonic()
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the first line, erase to the end
            self.stream.flush()
        self.drawn = 0


def eta_s(durations_s: list[float], remaining: int, slots: int) -> float | None:
    """Seconds left: the remaining trials in waves of `slots` (trials that run at once), each wave as long
    as the mean trial so far. Trial durations, not the wall-clock since start, so Ray's start-up and the
    first wave's idle GPUs do not inflate it; None before any trial finished."""
    if not durations_s:
        return None
    return math.ceil(max(0, remaining) / max(1, slots)) * (sum(durations_s) / len(durations_s))
