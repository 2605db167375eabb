"""What a stored study found: its facts, trials judged against an SLO, the front, the pick, the failures."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from tuner.engines import is_simulated
from tuner.errors import InputError
from tuner.export.command import points_under, study_objectives
from tuner.loadgen.slo import SLO, parse_slo
from tuner.outcome import Outcome
from tuner.records.objectives import THROUGHPUT, Objectives
from tuner.records.pareto import Point, pareto_front, pick
from tuner.records.recommend import Recommendation, recommend
from tuner.records.trial import StudyRecord, TrialRecord, records
from tuner.report.goodput import goodput_under
from tuner.report.hypervolume import hypervolume_2d, reference_latency
from tuner.report.startup import StartupRow, median_ready, read_campaign, startup_rows
from tuner.space.fit import output_changes
from tuner.space.knobs import load_space

STOPPED = "stopped early: "  # cause prefix of a trial a watcher stopped (tuner.study.pruning, fidelity)
# proposals stopped before a server started: a known constraint, or a learned prediction of failure
NEVER_LAUNCHED = (Outcome.CONSTRAINT, Outcome.PREDICTED_INFEASIBLE)


@dataclass(frozen=True)
class TrialIssue:
    """A trial that did not give a measurement, and why."""

    number: int
    engine: str
    state: str  # FAIL or PRUNED
    cause: str
    message: str
    last_log_line: str


@dataclass
class StudyResult:
    name: str
    engines: list[str]
    model: str
    gpu: str  # GPU kind, "?" where the study did not record it
    gpus: int
    workload: str
    workload_digest: str
    objectives: Objectives
    slo: SLO | None
    slo_source: str  # "study", "report" or "none"
    points: list[Point]
    front: list[Point]
    baseline: Point | None
    best: Point | None
    goodput: dict[int, float | None]  # trial number -> goodput under `slo`
    issues: list[TrialIssue]
    rejected: Counter  # reason -> proposals that never launched (NEVER_LAUNCHED)
    running: int
    finals: dict[int, dict[str, Any]] = field(default_factory=dict)  # trial -> `remeasured`, `capacity`
    recommendation: Recommendation | None = None
    startup: list[StartupRow] = field(default_factory=list)  # every server that answered, phase by phase
    campaign: dict[str, Any] = field(default_factory=dict)  # this run's GPU time (campaign.json), where written

    @property
    def simulated(self) -> bool:
        return is_simulated(self.engines)

    @property
    def label(self) -> str:
        text = f"{'+'.join(self.engines)} · {self.gpu}×{self.gpus} · {Path(self.model).name or self.model}"
        return text + (" (SIMULATED)" if self.simulated else "")

    @property
    def first_latency(self) -> str:
        return self.objectives.latency[0]

    def knobs_that_differ(self, shown: list[Point]) -> list[str]:
        return [k for k in dict.fromkeys(k for p in shown for k in p.config)
                if len({str(p.config.get(k)) for p in shown}) > 1]

    def slo_limit_ms(self, metric: str) -> float | None:
        for target in self.slo.targets if self.slo else ():
            if target.name == metric:
                return target.limit_ms
        return None

    def reference(self) -> tuple[float, float]:
        """Hypervolume reference point (throughput, first latency) for this study alone."""
        return 0.0, reference_latency(self.slo_limit_ms(self.first_latency),
                                      [p.value(self.first_latency) for p in self.points])

    def front_pairs(self) -> list[tuple[float, float]]:
        return [(p.value(THROUGHPUT), p.value(self.first_latency)) for p in self.front]

    def hypervolume(self, reference: tuple[float, float] | None = None) -> float:
        return hypervolume_2d(self.front_pairs(), reference or self.reference())

    def best_goodput(self) -> tuple[Point, float] | None:
        scored = [(p, g) for p in self.points if (g := self.goodput.get(p.number)) is not None]
        return max(scored, key=lambda item: item[1]) if scored else None

    def defaults_of(self, engine: str) -> Point | None:
        """That engine's own defaults, where the study measured them (each engine's, in a study of several)."""
        return next((p for p in self.points if p.baseline and p.engine == engine), None)

    def own_defaults(self) -> Point | None:
        """The best point's own engine's defaults, where that engine is not the baseline's (a study of several)."""
        if self.best is None or self.baseline is None or self.best.engine == self.baseline.engine:
            return None
        return self.defaults_of(self.best.engine)

    def ratios(self, against: Point | None = None) -> dict[str, float]:
        """best / defaults (the baseline, or `against`) for throughput, each latency objective and goodput (where
        both exist)."""
        base_point = against or self.baseline
        if self.best is None or base_point is None:
            return {}
        out = {}
        for metric in self.objectives.names:
            base = base_point.value(metric)
            if base:
                out[metric] = self.best.value(metric) / base
        good_best, good_base = self.goodput.get(self.best.number), self.goodput.get(base_point.number)
        if good_best is not None and good_base:
            out["goodput"] = good_best / good_base
        return out

    def metrics(self) -> dict[str, float]:
        """The figures worth keeping (MLflow metrics, sweep results)."""
        out: dict[str, float] = {"trials_completed": len(self.points), "trials_failed": len(self.issues),
                                 "trials_rejected": sum(self.rejected.values()), "pareto_size": len(self.front)}
        if self.points:
            out["hypervolume"] = self.hypervolume()
        if self.best is not None:
            out.update(best_trial=self.best.number, best_output_throughput=self.best.value(THROUGHPUT))
            out[f"best_{self.first_latency}"] = self.best.value(self.first_latency)
        if self.baseline is not None:
            out["baseline_output_throughput"] = self.baseline.value(THROUGHPUT)
        if THROUGHPUT in self.ratios():
            out["throughput_vs_defaults"] = self.ratios()[THROUGHPUT]
        if (best_good := self.best_goodput()) is not None:
            out["best_goodput"] = best_good[1]
        if (ready := median_ready(self.startup)) is not None:
            out["ready_median_s"] = ready
        if self.campaign.get("held_gpu_s"):
            out["measuring_over_held"] = float(self.campaign.get("utilisation", 0.0))
        return out


def _gpu_kind(study: optuna.Study, points: list[Point]) -> str:
    if study.user_attrs.get("gpu"):
        return str(study.user_attrs["gpu"])
    for point in points:  # the simulator's command names its GPU
        if "--gpu" in point.command[:-1]:
            return point.command[point.command.index("--gpu") + 1]
    return "?"


_ERROR_LINE = re.compile(r"(Error|Exception)\b:|\berror:", re.IGNORECASE)


def _telling_line(text: str) -> str:
    """The log's last error line (an exception, an argparse error), else its last line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return (errors or lines or [""])[-1][:200]


def _issues(trials: list[TrialRecord]) -> tuple[list[TrialIssue], Counter, int]:
    issues: list[TrialIssue] = []
    rejected: Counter = Counter()
    running = 0
    for r in trials:
        if r.state in ("RUNNING", "WAITING"):
            running += 1
        elif r.state in ("FAIL", "PRUNED") and r.failure in NEVER_LAUNCHED:
            rejected[r.message] += 1
        elif r.prescreened:
            rejected["screened out by the calibrated simulator"] += 1
        elif r.state in ("FAIL", "PRUNED"):
            stopped = r.stopped.get("kind")
            cause = f"{STOPPED}{stopped}" if stopped else r.failure or ("pruned" if r.state == "PRUNED" else "unknown")
            issues.append(TrialIssue(number=r.number, engine=r.engine, state=r.state, cause=str(cause),
                                     message=r.message, last_log_line=_telling_line(r.log_tail)))
    return issues, rejected, running


def load_result(study: optuna.Study, slo: SLO | None = None, run_dir: Path | None = None,
                prefer: str = "throughput") -> StudyResult:
    """`slo`: judge against this SLO instead of the study's own. `run_dir`: where the trials' rows lie."""
    rec = StudyRecord.of(study)
    source = "report" if slo is not None else "study" if rec.slo else "none"
    if slo is None and rec.slo:
        slo = parse_slo(rec.slo)
    objectives = study_objectives(study)
    points = points_under(study, slo)
    trials = records(study)
    issues, rejected, running = _issues(trials)
    finals = {int(number): final for number, final in rec.finals.items()}
    recommendation = recommend(points, objectives, slo, finals, rec.offered_rate, prefer,
                               output_changes_of(rec, points, prefer, objectives))
    return StudyResult(
        name=study.study_name, engines=list(rec.engines), model=rec.model,
        gpu=_gpu_kind(study, points), gpus=rec.gpus, workload=rec.workload,
        workload_digest=rec.workload_digest, objectives=objectives, slo=slo, slo_source=source,
        points=points, front=pareto_front(points, objectives), baseline=next((p for p in points if p.baseline), None),
        best=recommendation.point if recommendation else None,
        goodput={p.number: goodput_under(slo, p, run_dir) for p in points},
        issues=issues, rejected=rejected, running=running, finals=finals, recommendation=recommendation,
        startup=startup_rows(trials), campaign=read_campaign(run_dir))


def output_changes_of(rec: StudyRecord, points: list[Point], prefer: str, objectives: Objectives) -> tuple[str, ...]:
    """What the recommended configuration changes in the model's outputs (knobs marked in the space)."""
    best = pick(points, objectives, prefer, rec.offered_rate)
    if best is None:
        return ()
    source = rec.spaces.get(best.engine)
    try:
        space = load_space(source if source and Path(source).exists() else best.engine)
    except InputError:  # a space that moved or broke since the study ran: say nothing rather than fail
        return ()
    return tuple(output_changes(space, best.config))


