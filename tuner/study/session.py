"""The study session: open or resume an Optuna study, keep the live trials that `ask()` returned, and
record what happens to each through `TrialRecord`, with Optuna's public API only.

Lifecycle of a trial, all on the lead process:
  `ask()` -> `Trial` kept in `live` -> `save(number, ...)` as facts arrive -> exactly one of
  `tell_values`, `tell_pruned`, `tell_failed` (or `put_back` before a launch) -> dropped from `live`.
A trial left RUNNING by a killed `tune` is found by `recover_interrupted` on the next open: it is
failed, listed in the study record's `interrupted`, and its configuration queued again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.outcome import Outcome
from tuner.records.trial import SCHEMA_VERSION, StudyRecord, TrialRecord, records, save


class StudySession:
    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.live: dict[int, optuna.Trial] = {}

    # --- study-level -------------------------------------------------------------------------
    def record(self) -> StudyRecord:
        return StudyRecord.of(self.study)

    def save_study(self, **fields: Any) -> None:
        rec = self.record()
        for name, value in fields.items():
            if not hasattr(rec, name):
                raise AttributeError(f"StudyRecord has no field '{name}'")
            setattr(rec, name, value)
        rec.schema_version = SCHEMA_VERSION
        rec.save(self.study, "schema_version", *fields)

    def recover_interrupted(self) -> int:
        """Trials left RUNNING by a killed `tune`: fail them and queue their configurations again."""
        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not stale:
            return 0
        interrupted = self.record().interrupted
        for trial in stale:
            interrupted.append(trial.number)
            self.study.tell(trial.number, state=TrialState.FAIL)
            keep = {k: v for k, v in trial.user_attrs.items() if k == "baseline"}
            self.study.enqueue_trial(trial.params, user_attrs=keep, skip_if_exists=False)
        self.save_study(interrupted=interrupted)
        return len(stale)

    # --- trials ------------------------------------------------------------------------------
    def ask(self) -> optuna.Trial:
        trial = self.study.ask()
        self.live[trial.number] = trial
        return trial

    def save(self, number: int, **fields: Any) -> None:
        save(self.live[number], **fields)

    def tell_values(self, number: int, values: Sequence[float], constraints: dict[str, float]) -> None:
        trial = self.live.pop(number)
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        self.study.tell(trial, list(values))

    def tell_pruned(self, number: int, constraints: dict[str, float]) -> None:
        trial = self.live.pop(number)
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        self.study.tell(trial, state=TrialState.PRUNED)

    def tell_failed(self, number: int, failure: str, message: str, **fields: Any) -> None:
        self.save(number, failure=failure, message=message, **fields)
        self.study.tell(self.live.pop(number), state=TrialState.FAIL)

    def put_back(self, number: int) -> None:
        """A proposal never launched (out of time): failed as interrupted, its configuration queued again."""
        trial = self.live[number]
        rec = self.trial_record(number)
        self.tell_failed(number, Outcome.INTERRUPTED, "not launched before the budget ran out")
        keep: dict[str, Any] = {"baseline": True} if rec.baseline else {}
        self.study.enqueue_trial(trial.params, user_attrs=keep, skip_if_exists=False)

    def requeue(self, number: int, lost_from: int) -> None:
        rec = self.trial_record(number)
        keep: dict[str, Any] = {"requeued_from": lost_from}
        if rec.baseline:
            keep["baseline"] = True
        self.study.enqueue_trial(self.live[number].params, skip_if_exists=False, user_attrs=keep)

    def trial_record(self, number: int) -> TrialRecord:
        trial = self.live.get(number)
        if trial is not None:
            return TrialRecord(number=number, state="RUNNING", **{
                k: v for k, v in trial.user_attrs.items() if k in TrialRecord.__dataclass_fields__})
        return TrialRecord.from_trial(self.study.get_trials(deepcopy=False)[number])

    def records(self, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
        return records(self.study, states)

    def finished(self) -> int:
        """Trials that ran to an end (completed, stopped early, or failed on a server): not rejected,
        not predicted to fail, not interrupted, not lost and queued again."""
        return sum(1 for r in self.records((TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
                   if (r.state != TrialState.PRUNED.name or r.stopped)
                   and r.failure not in (Outcome.CONSTRAINT, Outcome.INTERRUPTED) and not r.requeued)
