"""The on-disk format of a study: what each trial and the study itself keep as Optuna user attributes.

Every module that stores or reads a trial's data goes through `TrialRecord` (one field per user
attribute) and `StudyRecord` (the study's). Schema versions: 1 = round-1 stores (no `schema_version`
attribute), 2 = this module. Version 1 reads as version 2: the keys are the same, new fields default.
Writing is partial (`save(trial, field=value, ...)`), because a trial's facts arrive at different
moments: its configuration when proposed, its placement when launched, its results when it ends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

SCHEMA_VERSION = 2


@dataclass
class TrialRecord:
    number: int = -1
    state: str = ""  # Optuna's state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)
    # proposed
    engine: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False  # the engine's defaults
    # placed and launched
    launched_at: float | None = None
    gpus: int | None = None
    node: str = ""
    gpu_ids: list[str] = field(default_factory=list)
    cuda_visible_devices: str = ""
    nvlink: bool | None = None
    started_at: float | None = None
    ended_at: float | None = None
    measure_s: float | None = None
    # ran
    command: list[str] = field(default_factory=list)
    wall_s: float | None = None
    ready_s: float | None = None
    startup_phases: dict[str, float] = field(default_factory=dict)
    forked: bool = False  # its server was forked from a fork server with the engine preloaded
    teardown: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    engine_metrics: dict[str, Any] = field(default_factory=dict)
    constraints: list[float] = field(default_factory=list)  # SLO: percentile - limit (ms), <= 0 met
    unreliable: list[str] = field(default_factory=list)  # why the measurement cannot be trusted
    predicted: dict[str, Any] = field(default_factory=dict)  # what a simulator predicted before it ran
    prescreened: str = ""  # why the calibrated simulator kept it off the GPUs (never launched)
    seeded: str = ""  # queued by the calibrated simulator as one of its best guesses (tuner.study.prescreen)
    # ended early or failed
    rung_scores: list[list[Any]] = field(default_factory=list)
    stopped: dict[str, Any] = field(default_factory=dict)  # kind, reason, finished, elapsed_s, bound...
    failure: str | None = None  # a tuner.outcome.Outcome value
    message: str = ""
    log_tail: str = ""
    requeued: bool = False  # lost, and its configuration queued again
    requeued_from: int | None = None

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> TrialRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        attrs = {k: v for k, v in trial.user_attrs.items() if k in known}
        return cls(number=trial.number, state=trial.state.name, **attrs)

    def to_attrs(self) -> dict[str, Any]:
        """The fields that differ from their defaults, as JSON-able user attributes."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("number", "state"):
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                out[f.name] = _plain(value)
        return out

    @property
    def completed(self) -> bool:
        return self.state == TrialState.COMPLETE.name and bool(self.summary)

    @property
    def stopped_early(self) -> bool:
        return self.state == TrialState.PRUNED.name and bool(self.stopped)

    @property
    def meets_slo(self) -> bool:
        return all(c <= 0 for c in self.constraints)


_FIELDS = {f.name for f in dataclasses.fields(TrialRecord)} - {"number", "state"}


def _plain(value: Any) -> Any:
    """Enums (failure classes) are stored as their plain string values."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save(trial: optuna.Trial, **fields: Any) -> None:
    """Store some fields of a live trial's record (names checked against `TrialRecord`)."""
    for name, value in fields.items():
        if name not in _FIELDS:
            raise AttributeError(f"TrialRecord has no field '{name}'")
        trial.set_user_attr(name, _plain(value))


def records(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    """The trials' records; a trial a killed `tune` left running (listed in the study record's
    `interrupted`: a finished trial's attributes cannot change) reads as failure "interrupted"."""
    interrupted = set(study.user_attrs.get("interrupted", ()))
    out = []
    for trial in study.get_trials(deepcopy=False, states=states):
        rec = TrialRecord.from_trial(trial)
        if trial.number in interrupted and rec.failure is None:
            rec.failure = "interrupted"
        out.append(rec)
    return out


@dataclass
class StudyRecord:
    """The study's own user attributes."""

    schema_version: int = 1
    objectives: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    model: str = ""
    workload: str = ""
    workload_digest: str = ""
    gpus: int = 0
    gpu: str = ""
    slo: str = ""
    spaces: dict[str, str] = field(default_factory=dict)
    engine_versions: dict[str, str] = field(default_factory=dict)
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial number -> remeasured, capacity
    interrupted: list[int] = field(default_factory=list)  # trials a killed `tune` left running
    excluded: list[list[Any]] = field(default_factory=list)  # [knob, value, reason]: left the space
    engine_args: list[str] = field(default_factory=list)  # every server's extra args (exports drop machine ones)
    engine_args_by_engine: dict[str, list[str]] = field(default_factory=dict)  # each engine's, common ones first
    offered_rate: float = 0.0  # the trace's requests per second (server clock), 0 when closed loop
    selection: dict[str, Any] = field(default_factory=dict)  # rows, seconds, time_scale as tune sliced the trace

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in study.user_attrs.items() if k in known})

    def save(self, study: optuna.Study, *names: str) -> None:
        """Store the named fields (all when none are named)."""
        for f in dataclasses.fields(self):
            if not names or f.name in names:
                study.set_user_attr(f.name, _plain(getattr(self, f.name)))
