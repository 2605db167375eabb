"""What a sweep run records, one JSON file per run: every cell's figures and the comparison's verdict."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import InputError


@dataclass
class CellResult:
    id: str
    study: str
    model: str
    workload: str
    engine: str
    gpu: str | None
    gpus: int
    simulated: bool
    status: str  # "ok", "no trial completed", or "skipped: <why>"
    trials_completed: int = 0
    trials_failed: int = 0
    trials_stopped: int = 0  # stopped early on purpose (SLO certainly lost, halving): not failures
    trials_rejected: int = 0
    first_latency: str = ""
    best_trial: int | None = None
    best_throughput: float | None = None  # output tok/s of the pick (within the SLO)
    best_latency_ms: float | None = None  # its first latency objective
    best_goodput: float | None = None  # req/s meeting the SLO, best over the trials
    baseline_throughput: float | None = None  # the engine's defaults
    baseline_latency_ms: float | None = None
    baseline_goodput: float | None = None
    front: list[list[float]] = field(default_factory=list)  # [throughput, first latency] per front point
    reference: list[float] = field(default_factory=list)  # hypervolume reference [throughput, latency]
    hypervolume: float | None = None
    repeats: list[dict[str, float | None]] = field(default_factory=list)  # defaults measured again
    noise_cv: float | None = None  # largest coefficient of variation over the repeats' metrics
    report: str = ""


@dataclass
class MetricChange:
    name: str
    old: float | None
    new: float | None
    change: float | None  # new / old - 1
    regressed: bool


@dataclass
class CellComparison:
    cell: str
    previous_run: str | None
    changes: list[MetricChange] = field(default_factory=list)
    regressed: bool = False
    note: str = ""


@dataclass
class RunResults:
    spec: str
    spec_path: str
    run_id: str
    started_at: str
    finished_at: str
    storage: str
    slo: str
    cells: list[CellResult]
    noise_threshold: float = 0.0
    noise_source: str = ""
    learned_threshold: float | None = None  # from this run's repeats; later runs inherit it
    regression: bool = False
    comparisons: list[CellComparison] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResults:
        data = dict(data)
        data["cells"] = [CellResult(**c) for c in data.get("cells", [])]
        data["comparisons"] = [CellComparison(**{**c, "changes": [MetricChange(**m) for m in c.get("changes", [])]})
                               for c in data.get("comparisons", [])]
        return cls(**data)


def read_run(path: Path) -> RunResults:
    try:
        return RunResults.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"not a sweep results file: {exc}", file=str(path)) from None


def history(runs_dir: Path) -> list[RunResults]:
    """Earlier runs of a spec, oldest first (run ids are UTC timestamps)."""
    return sorted((read_run(p) for p in runs_dir.glob("*.json")), key=lambda r: r.run_id)
