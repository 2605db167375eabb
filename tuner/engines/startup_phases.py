"""A server's start-up broken into phases, from the lines its own log prints.

Engine-neutral: an adapter says which lines report which phase (`StartupPatterns`); this module only
reads a log with them. Two kinds of evidence are combined:
- durations the engine reports itself ("... took 12.3 s"): exact, kept as printed;
- the log's own timestamps (whole seconds), for what no line reports: the time from launch to the
  engine's first log line (interpreter start and imports) and from the engine's "initialised" line
  to the moment the API answered (the runner's ready time). These two are good to about a second.
Whatever the evidence does not explain is `other` (process spawns, tokenizer, config resolution).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

READY = "ready"
IMPORT = "import"
API_UP = "api_up"
OTHER = "other"


@dataclass(frozen=True)
class PhasePattern:
    """A log line that reports one phase's seconds (group 1)."""

    phase: str
    pattern: re.Pattern
    minus: tuple[str, ...] = ()  # phases the reported seconds include, taken out of this one


@dataclass(frozen=True)
class StartupPatterns:
    phases: tuple[PhasePattern, ...]
    clock: re.Pattern  # a line's timestamp: groups month, day, hour, minute, second (local time)
    initialised: re.Pattern  # the line after which only the API server's own start remains


@dataclass
class StartupPhases:
    """Seconds per phase, in start-up order; `ready` is the runner's own launch-to-healthy time."""

    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}


def _line_epoch(match: re.Match, year: int) -> float:
    month, day, hour, minute, second = (int(g) for g in match.groups()[:5])
    return time.mktime((year, month, day, hour, minute, second, 0, 0, -1))


def parse_startup(log_text: str, patterns: StartupPatterns, launched_at: float, ready_s: float) -> StartupPhases:
    """Phases of one start-up. `launched_at`: epoch seconds when the process was started."""
    year = time.localtime(launched_at).tm_year
    reported: dict[str, float] = {}
    first_stamp: float | None = None
    initialised_at: float | None = None
    for line in log_text.splitlines():
        stamp = patterns.clock.search(line)
        if stamp and first_stamp is None:
            first_stamp = _line_epoch(stamp, year)
        for item in patterns.phases:
            found = item.pattern.search(line)
            if found:  # workers of one server print the same phase while running side by side: the longest
                reported[item.phase] = max(reported.get(item.phase, 0.0), float(found.group(1)))
        if stamp and patterns.initialised.search(line):
            initialised_at = _line_epoch(stamp, year)
    seconds: dict[str, float] = {}
    if first_stamp is not None:
        seconds[IMPORT] = max(0.0, first_stamp - launched_at)
    for item in patterns.phases:
        if item.phase in reported:
            inner = sum(reported.get(name, 0.0) for name in item.minus)
            seconds[item.phase] = max(0.0, reported[item.phase] - inner)
    if initialised_at is not None and ready_s > 0:
        seconds[API_UP] = max(0.0, launched_at + ready_s - initialised_at)
    if ready_s > 0:
        seconds[OTHER] = max(0.0, ready_s - sum(seconds.values()))
        seconds[READY] = ready_s
    return StartupPhases(seconds)
