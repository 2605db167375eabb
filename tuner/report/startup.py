"""How long each trial's server took to start, phase by phase (the engine's own log), and how much of the GPU
time held went to measuring: the two figures that decide how many trials a GPU-hour buys."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.records.trial import TrialRecord


@dataclass(frozen=True)
class StartupRow:
    """One server that answered: seconds per start-up phase (`ready` excluded) and launch-to-ready."""

    number: int
    engine: str
    ready_s: float
    forked: bool = False
    phases: dict[str, float] = field(default_factory=dict)


def startup_rows(trials: list[TrialRecord]) -> list[StartupRow]:
    return [StartupRow(number=r.number, engine=r.engine, ready_s=float(r.ready_s), forked=r.forked,
                       phases={k: v for k, v in r.startup_phases.items() if k != "ready"})
            for r in trials if r.ready_s]


def read_campaign(run_dir: Path | None) -> dict[str, Any]:
    """The campaign's GPU-time summary `tune` wrote beside the trials (campaign.json), or {}."""
    path = run_dir / "campaign.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def median_ready(rows: list[StartupRow]) -> float | None:
    return statistics.median(row.ready_s for row in rows) if rows else None


def median_phase(rows: list[StartupRow], name: str) -> float | None:
    values = [row.phases[name] for row in rows if name in row.phases]
    return statistics.median(values) if values else None
