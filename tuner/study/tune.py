"""The tuning loop: Optuna proposes, Ray actors measure, MLflow records, the Pareto front comes out."""

from __future__ import annotations

import itertools
import random
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.engines import get_engine
from tuner.engines.base import FailureClass, Launch
from tuner.errors import InputError
from tuner.hardware.gpus import get_gpu
from tuner.loadgen.slo import SLO
from tuner.models.shapes import ModelShape
from tuner.runner.trial import TrialOutcome, TrialSpec
from tuner.space.constraints import Context, gpus_needed, violations
from tuner.space.knobs import SearchSpace, load_space
from tuner.study.objectives import Objectives, slo_constraints
from tuner.study.pareto import completed_points, front_table, pareto_front, pick
from tuner.study.sampling import baseline_params, suggest_config
from tuner.workload.request import TraceRequest

MAX_REJECTED_PER_TRIAL = 50


@dataclass
class TuneOptions:
    workload: Path
    requests: list[TraceRequest]
    workload_digest: str
    engines: list[str]
    model: str
    shape: ModelShape | None
    gpus: int
    gpu: str | None
    trials: int | None = 12
    budget_s: float | None = None
    objectives: Objectives = field(default_factory=Objectives)
    slo: SLO | None = None
    sampler: str = "tpe"
    seed: int | None = None
    study_name: str = ""
    storage: str = ""
    out_dir: Path = Path("servetune-runs")
    mlflow_uri: str | None = None
    ray_address: str | None = None
    space_path: str | None = None
    fix: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    endpoint: str = "completions"
    concurrency: int | None = None
    max_concurrency: int | None = None
    warmup_requests: int = 2
    sim_time_scale: float = 10.0
    startup_timeout_s: float = 600.0
    engine_python: str = sys.executable
    engine_args: list[str] = field(default_factory=list)
    engine_env: list[tuple[str, str]] = field(default_factory=list)
    vocab_size: int = 32000
    max_model_len: int | None = None
    quiet: bool = False


def build_spaces(options: TuneOptions) -> dict[str, SearchSpace]:
    spaces = {}
    for engine in options.engines:
        space = load_space(options.space_path if options.space_path and len(options.engines) == 1 else engine)
        for item in options.fix:
            name, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"expected KNOB=VALUE, got '{item}'", file="--fix")
            space.fix(name.strip(), value.strip())
        for group in options.exclude:
            space.exclude(group)
        fit_parallelism(space, options.gpus, options.shape)
        spaces[engine] = space
    return spaces


def fit_parallelism(space: SearchSpace, gpus: int, shape: ModelShape | None) -> None:
    """Parallel sizes that cannot fit the GPUs (or split the heads) leave the space before sampling."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        knob = space.knobs.get(name)
        if knob is None or knob.type != "categorical":
            continue
        keep = tuple(c for c in knob.choices if int(c) <= gpus and not (
            name == "tensor_parallel_size" and shape is not None and shape.num_heads % int(c)))
        if keep and keep != knob.choices:
            space.knobs[name] = replace(knob, choices=keep, default=knob.default if knob.default in keep else keep[0])


def grid_of(spaces: dict[str, SearchSpace]) -> dict[str, list[Any]]:
    """Every value of every searched knob, for the grid sampler (categorical and bool knobs only)."""
    from tuner.study.sampling import param_name

    grid: dict[str, list[Any]] = {}
    several = len(spaces) > 1
    if several:
        grid["engine"] = list(spaces)
    for engine, space in spaces.items():
        for name, knob in space.knobs.items():
            if knob.fixed:
                continue
            if knob.type not in ("categorical", "bool"):
                raise InputError(f"the grid sampler needs discrete knobs; '{name}' is {knob.type} "
                                 "(--fix it, --exclude it, or make it categorical in --space)", field="sampler")
            grid[param_name(engine, name, several)] = list(knob.choices)
    return grid


def make_sampler(name: str, parallel: bool, seed: int | None,
                 spaces: dict[str, SearchSpace] | None = None) -> optuna.samplers.BaseSampler:
    """SLO constraints reach every sampler through Trial.set_constraint (see Tuner._record)."""
    if name in ("random", "grid"):  # the grid is enqueued up front (Tuner.open_study)
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=parallel, seed=seed,
                                              n_startup_trials=6)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    raise InputError(f"unknown sampler '{name}' (tpe, nsga2, random, grid)", field="sampler")


def _finished(study: optuna.Study) -> int:
    """Trials that ran to an end (completed or failed on a server): not rejected, not interrupted."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
               if t.user_attrs.get("failure") not in (FailureClass.CONSTRAINT, FailureClass.INTERRUPTED))


def _recover_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed `tune`: mark them failed and queue their configs again."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "failure", FailureClass.INTERRUPTED)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={k: v for k, v in trial.user_attrs.items()
                                                      if k == "baseline"}, skip_if_exists=False)
        count += 1
    return count


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Tuner:
    def __init__(self, options: TuneOptions) -> None:
        self.options = options
        self.spaces = build_spaces(options)
        self.engine_versions: dict[str, str] = {}
        for engine, space in self.spaces.items():
            self._fit_space_to_installed(engine, space)
        gpu_spec = get_gpu(options.gpu) if options.gpu else None
        self.context = Context(gpus=options.gpus, gpu=gpu_spec, model=options.shape,
                               max_model_len=options.max_model_len)
        self.run_dir = options.out_dir / options.study_name
        self.tracker = None
        self.started = time.monotonic()
        self.trial_wall: list[float] = []
        self.measured = 0

    def _fit_space_to_installed(self, engine: str, space: SearchSpace) -> None:
        from tuner.engines.probe import drop_unsupported, flags_in, probe_help

        adapter = get_engine(engine)
        help_argv = adapter.help_argv(self.options.engine_python)
        if help_argv is None:
            return
        version = adapter.version(self.options.engine_python)
        if version == "unknown":
            raise InputError(f"{engine} is not importable by {self.options.engine_python}; install it there "
                             "or pass --engine-python", field="engine-python")
        self.engine_versions[engine] = version
        for note in drop_unsupported(space, flags_in(probe_help(engine, version, help_argv))):
            self.say(f"note: {note}")

    # --- Optuna -----------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        parallel = self.options.gpus > 1
        study = optuna.create_study(study_name=self.options.study_name, storage=self.options.storage,
                                    directions=self.options.objectives.directions, load_if_exists=True,
                                    sampler=make_sampler(self.options.sampler, parallel, self.options.seed, self.spaces))
        if study.trials and self.options.seed is not None:
            # a resumed study must not replay the first run's proposals: move the seed on
            study.sampler = make_sampler(self.options.sampler, parallel, self.options.seed + len(study.trials),
                                         self.spaces)
        stored = study.user_attrs.get("objectives")
        if stored and stored != self.options.objectives.names:
            raise InputError(f"study '{self.options.study_name}' was created with objectives {stored}; "
                             "use another --study-name", field="study-name")
        attrs = {"objectives": self.options.objectives.names, "engines": self.options.engines,
                 "model": self.options.model, "workload": str(self.options.workload),
                 "workload_digest": self.options.workload_digest, "gpus": self.options.gpus,
                 "slo": str(self.options.slo) if self.options.slo else "",
                 "spaces": {e: s.source for e, s in self.spaces.items()}}
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        recovered = _recover_interrupted(study)
        if recovered:
            self.say(f"resuming: {recovered} interrupted trial(s) will run again")
        if not study.trials:
            engine = self.options.engines[0]
            study.enqueue_trial(baseline_params(self.spaces, engine), user_attrs={"baseline": True})
            if self.options.sampler == "grid":
                grid = grid_of(self.spaces)
                points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
                random.Random(self.options.seed).shuffle(points)
                for params in points:
                    study.enqueue_trial(params)
        return study

    # --- output ------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.options.quiet:
            print(text, flush=True)

    def _progress(self, study: optuna.Study, number: int, outcome_text: str, total: int) -> None:
        done = _finished(study)
        points = completed_points(study)
        best = pick(points, self.options.objectives)
        best_text = (f"best {best.value('output_throughput'):.0f} tok/s (#{best.number})" if best
                     else "no feasible trial yet")
        eta = ""
        if self.trial_wall and total:
            per_trial = (time.monotonic() - self.started) / max(1, self.measured)
            eta = f" | ETA {_fmt_duration(per_trial * max(0, total - done))}"
        self.say(f"[{done}/{total or '?'}] trial {number}: {outcome_text} | {best_text}{eta}")

    # --- trials ------------------------------------------------------------------------------
    def _trial_spec(self, number: int, engine: str, config: dict[str, Any], baseline: bool) -> TrialSpec:
        o = self.options
        launch = Launch(config=config, model=o.model, baseline=baseline, gpu=o.gpu or "h100",
                        time_scale=o.sim_time_scale, python=sys.executable if engine == "sim" else o.engine_python,
                        extra_args=tuple(o.engine_args), extra_env=tuple(o.engine_env))
        return TrialSpec(number=number, engine=engine, space=self.spaces[engine], launch=launch,
                         requests=o.requests, out_dir=self.run_dir.resolve(), endpoint=o.endpoint,
                         concurrency=o.concurrency, max_concurrency=o.max_concurrency,
                         warmup_requests=o.warmup_requests, vocab_size=o.vocab_size, slo=o.slo,
                         startup_timeout_s=o.startup_timeout_s)

    def _record(self, study: optuna.Study, spec: TrialSpec, outcome: TrialOutcome | None, error: str,
                total: int) -> None:
        number = spec.number
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        storage = study._storage
        self.measured += 1
        if outcome is None:
            outcome = TrialOutcome(number=number, ok=False, command=[], failure=FailureClass.CRASH,
                                   message=f"trial actor lost: {error}")
        self.trial_wall.append(outcome.ended_at - outcome.started_at)
        storage.set_trial_user_attr(trial_id, "command", outcome.command)
        storage.set_trial_user_attr(trial_id, "wall_s", round(outcome.ended_at - outcome.started_at, 2))
        storage.set_trial_user_attr(trial_id, "ready_s", round(outcome.ready_s, 2))
        storage.set_trial_user_attr(trial_id, "teardown", {"port_released": outcome.port_released,
                                                           "gpu_memory_released": outcome.gpu_memory_released})
        if outcome.ok:
            values = self.options.objectives.values(outcome.summary)
            constraints = slo_constraints(self.options.slo, outcome.summary)
            storage.set_trial_user_attr(trial_id, "summary", outcome.summary)
            storage.set_trial_user_attr(trial_id, "engine_metrics", outcome.engine_metrics)
            storage.set_trial_user_attr(trial_id, "constraints", constraints)
            live_trial = optuna.trial.Trial(study, trial_id)
            for target, value in zip(self.options.slo.targets if self.options.slo else (), constraints):
                live_trial.set_constraint(target.name, value)
            study.tell(number, values)
            lat = " ".join(f"{m} {v:.0f}ms" for m, v in zip(self.options.objectives.latency, values[1:]))
            text = f"{values[0]:.0f} tok/s {lat}" + (" (misses SLO)" if any(c > 0 for c in constraints) else "")
        else:
            storage.set_trial_user_attr(trial_id, "failure", outcome.failure)
            storage.set_trial_user_attr(trial_id, "message", outcome.message)
            storage.set_trial_user_attr(trial_id, "log_tail", outcome.log_tail[-4000:])
            study.tell(number, state=TrialState.FAIL)
            text = f"FAILED ({outcome.failure}: {outcome.message})"
        if self.tracker is not None:
            self.tracker.log_trial(number, spec.engine, spec.launch.config, outcome.command,
                                   "COMPLETE" if outcome.ok else "FAIL", outcome.summary, outcome.engine_metrics,
                                   self._tags(spec.engine), outcome.failure, outcome.message,
                                   [outcome.log_path, outcome.rows_csv, outcome.summary_json])
        self._progress(study, number, text, total)

    def _tags(self, engine: str) -> dict[str, str]:
        if engine not in self.engine_versions:
            self.engine_versions[engine] = get_engine(engine).version(
                sys.executable if engine == "sim" else self.options.engine_python)
        return {"engine_version": self.engine_versions[engine], "gpu": self.options.gpu or "unknown",
                "gpus": str(self.options.gpus), "trace_sha256": self.options.workload_digest,
                "model": self.options.model, "simulated": str(engine == "sim").lower()}

    def run(self) -> optuna.Study:
        from tuner.runner.pool import TrialPool, init_ray

        o = self.options
        study = self.open_study()
        total = o.trials or 0
        if o.mlflow_uri:
            from tuner.tracking.mlflow_log import StudyTracker

            self.tracker = StudyTracker(o.mlflow_uri, "servetune", o.study_name)
            self.tracker.log_study({"workload": o.workload, "model": o.model, "engines": ",".join(o.engines),
                                    "gpus": o.gpus, "objectives": ",".join(o.objectives.names),
                                    "slo": str(o.slo) if o.slo else "", "sampler": o.sampler,
                                    "optuna_storage": o.storage},
                                   {"trace_sha256": o.workload_digest,
                                    "simulated": str(o.engines == ["sim"]).lower()})
        already = _finished(study)
        if o.trials is not None and already >= o.trials:
            self.say(f"study '{o.study_name}' already has {already} finished trials (asked for {o.trials})")
            return study
        init_ray(o.ray_address, o.gpus)
        pool = TrialPool(o.gpus)
        rejected = 0
        deadline = self.started + o.budget_s if o.budget_s else None
        self.say(f"study '{o.study_name}': {already} trials done, running up to "
                 f"{(o.trials or 0) - already if o.trials else 'unbounded'} more on {o.gpus} GPU(s), "
                 f"engine(s) {', '.join(o.engines)}{' (SIMULATED)' if o.engines == ['sim'] else ''}")
        try:
            while True:
                out_of_time = deadline is not None and time.monotonic() >= deadline
                enough = o.trials is not None and _finished(study) + len(pool) >= o.trials
                if out_of_time or enough or rejected > MAX_REJECTED_PER_TRIAL * max(1, o.trials or 1):
                    break
                if pool.free_gpus <= 0:
                    self._record(study, *pool.wait_one(), total)
                    continue
                trial = study.ask()
                baseline = bool(trial.user_attrs.get("baseline"))
                engine, config = suggest_config(trial, self.spaces, baseline)
                trial.set_user_attr("engine", engine)
                trial.set_user_attr("config", config)
                reasons = violations(config, self.context)
                if reasons:
                    trial.set_user_attr("failure", FailureClass.CONSTRAINT)
                    trial.set_user_attr("message", "; ".join(reasons))
                    study.tell(trial, state=TrialState.FAIL)
                    rejected += 1
                    continue
                need = gpus_needed(config)
                while pool.free_gpus < need:
                    self._record(study, *pool.wait_one(), total)
                pool.submit(self._trial_spec(trial.number, engine, config, baseline), need)
            while len(pool):
                self._record(study, *pool.wait_one(), total)
        finally:
            if rejected:
                self.say(f"{rejected} proposed configuration(s) broke a known constraint and never launched")
        return study

    # --- results -----------------------------------------------------------------------------
    def report(self, study: optuna.Study) -> dict[str, Any]:
        o = self.options
        points = completed_points(study)
        if not points:
            self.say("no trial completed: see the failures above")
            return {}
        front = pareto_front(points, o.objectives)
        baseline = next((p for p in points if p.baseline), None)
        shown = front + ([baseline] if baseline else [])
        knobs = [k for k in dict.fromkeys(k for p in shown for k in p.config)
                 if len({str(p.config.get(k)) for p in shown}) > 1]  # the knobs that tell the points apart
        table = front_table(front, o.objectives, baseline, knobs)
        self.say("\nPareto front (throughput vs " + ", ".join(o.objectives.latency) + "):\n" + table)
        from tuner.tracking.plots import pareto_html, pareto_png

        title = f"{o.study_name}: {', '.join(o.engines)}{' (SIMULATED)' if o.engines == ['sim'] else ''}"
        png = pareto_png(points, front, o.objectives, self.run_dir / "pareto.png", title)
        html = pareto_html(points, front, o.objectives, self.run_dir / "pareto.html", title)
        (self.run_dir / "pareto.txt").write_text(table + "\n")
        best = pick(points, o.objectives)
        summary: dict[str, Any] = {"trials_completed": len(points), "pareto_size": len(front)}
        if best is not None:
            summary.update(best_trial=best.number, best_output_throughput=best.value("output_throughput"))
            command = shlex.join(best.command)
            self.say(f"\nrecommended (trial {best.number}, highest throughput"
                     f"{' within the SLO' if o.slo else ''}):\n  {command}")
            if baseline is not None:
                ratio = best.value("output_throughput") / max(baseline.value("output_throughput"), 1e-9)
                summary["throughput_vs_defaults"] = ratio
                self.say(f"  throughput ×{ratio:.2f} vs the engine's defaults (trial {baseline.number})")
        else:
            self.say("\nno trial met the SLO; relax it or widen the space")
        self.say(f"\nplots: {png}  {html}")
        if self.tracker is not None:
            self.tracker.log_study_artifacts([png, html, self.run_dir / "pareto.txt"], summary)
            self.tracker.finish()
        return summary
