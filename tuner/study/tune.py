"""The tuning loop: Optuna proposes, Ray actors measure, MLflow records, the Pareto front comes out."""

from __future__ import annotations

import copy
import itertools
import random
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from tuner.engines import get_engine
from tuner.engines.base import FailureClass, Launch
from tuner.errors import InputError
from tuner.hardware.gpus import get_gpu
from tuner.loadgen.slo import SLO
from tuner.models.shapes import ModelShape
from tuner.runner.campaign import Campaign, TrialSpan, gantt_png, with_earlier_trials
from tuner.runner.progress import LiveLines, eta_s
from tuner.runner.trial import TrialOutcome, TrialSpec
from tuner.space.constraints import Context, gpus_needed, violations
from tuner.space.knobs import SearchSpace, load_space
from tuner.report.results import record_run_facts
from tuner.study.feasibility import PREDICTED_INFEASIBLE, FeasibilityModel, observations_from_study, tell_infeasible
from tuner.study.capacity import CapacitySearch
from tuner.study.fidelity import (RungWatch, SuccessiveHalving, estimates_of, finalists, retimed, rung_scores_attr,
                                  stopped_constraints)
from tuner.study.objectives import Objectives, slo_constraints
from tuner.study.pareto import completed_points, pick
from tuner.study.pruning import SloPruner
from tuner.study.sampling import baseline_params, suggest_config
from tuner.study.storage import cluster_notes, open_storage
from tuner.workload.request import TraceRequest

if TYPE_CHECKING:
    from tuner.runner.pool import Finished, TrialPool

MAX_REJECTED_PER_TRIAL = 50
# Packing (Tuner.run): up to LOOKAHEAD_PER_GPU × GPUs proposals wait for GPUs while later, smaller ones
# use the idle GPUs; one that PASS_OVER_PER_GPU × GPUs launches have passed then holds GPUs back until
# it fits. Twice the GPUs for both came out best for equal-length trials of 1 to 8 GPUs on 8 GPUs in
# a model of the loop: smaller values drain GPUs for large trials more often.
LOOKAHEAD_PER_GPU = 2
PASS_OVER_PER_GPU = 2
LIVE_REFRESH_S = 2.0  # the loop wakes this often to redraw the running trials' live lines


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
    host: str = "127.0.0.1"  # the address trial servers bind
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
    dummy_weights: bool = False
    quiet: bool = False
    prune: bool = True  # with an SLO: stop a trial as soon as its SLO is certainly lost
    halving: bool = False  # successive halving over trace length; stop trials that cannot beat the best
    eta: float = 2.0
    finalists: int = 0  # best configurations measured again after the search
    repeats: int = 3  # re-measurements per finalist, each with other arrival times
    capacity: bool = False  # with an SLO: highest request rate each finalist sustains, by bisection
    attainment: float = 0.99  # fraction of requests that must meet the SLO for a rate to hold


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
    """Trials that ran to an end (completed, stopped early, or failed on a server): not rejected, not
    predicted to fail, not interrupted, not lost and queued again."""
    return sum(1 for t in study.get_trials(deepcopy=False,
                                           states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
               if (t.state != TrialState.PRUNED or "stopped" in t.user_attrs)
               and t.user_attrs.get("failure") not in (FailureClass.CONSTRAINT, FailureClass.INTERRUPTED)
               and not t.user_attrs.get("requeued"))


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


@dataclass
class _Proposal:
    """A configuration Optuna proposed that waits for enough GPUs on one node."""

    number: int
    engine: str
    config: dict[str, Any]
    baseline: bool
    need: int
    passed_over: int = 0


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Tuner:
    lookahead: int | None = None  # proposals that may wait for GPUs; 1 = strict order (no packing)

    def __init__(self, options: TuneOptions) -> None:
        self.options = options
        self.live, self.slots = LiveLines(), 1  # live lines of running trials; most trials seen running at once
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
        self.avoided = 0  # proposals the feasibility model kept off the GPUs
        self.halving = SuccessiveHalving(eta=options.eta)
        self.stopped = 0  # trials stopped early this run
        self.saved_gpu_s = 0.0  # replay time that trials stopped early did not run, times their GPUs

    def _fit_space_to_installed(self, engine: str, space: SearchSpace) -> None:
        from tuner.engines.probe import drop_unsupported, flags_in, probe_help

        adapter = get_engine(engine)
        help_argv = adapter.help_argv(self.options.engine_python)
        if help_argv is None:
            self.engine_versions[engine] = adapter.version(self.options.engine_python)
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
        study = optuna.create_study(study_name=self.options.study_name, storage=open_storage(self.options.storage),
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
                 "engine_args": list(self.options.engine_args),  # exports drop the machine-specific ones
                 "spaces": {e: s.source for e, s in self.spaces.items()}}
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        record_run_facts(study, self.options.gpu, self.engine_versions)
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
            self.live.clear()
            print(text, flush=True)

    def _show_live(self, pool: TrialPool) -> None:
        """One line per running trial, from the progress files the trials write (tuner.runner.progress)."""
        self.slots = max(self.slots, len(pool))
        if not self.options.quiet:
            self.live.show([item.spec.out_dir / item.spec.run_name for item in pool.running.values()])

    def _progress(self, study: optuna.Study, number: int, outcome_text: str, total: int) -> None:
        done = _finished(study)
        points = completed_points(study)
        best = pick(points, self.options.objectives)
        best_text = (f"best {best.value('output_throughput'):.0f} tok/s (#{best.number})" if best
                     else "no feasible trial yet")
        left = eta_s([s for s in self.trial_wall if s > 0], total - done, self.slots) if total else None
        eta = f" | ETA {_fmt_duration(left)}" if left is not None else ""
        self.say(f"[{done}/{total or '?'}] trial {number}: {outcome_text} | {best_text}{eta}")

    # --- trials ------------------------------------------------------------------------------
    def _trial_spec(self, number: int, engine: str, config: dict[str, Any], baseline: bool,
                    study: optuna.Study | None = None) -> TrialSpec:
        """`study`: give the trial the watchers that may stop it early (never the defaults baseline)."""
        o = self.options
        launch = Launch(config=config, model=o.model, baseline=baseline, host=o.host, gpu=o.gpu or "h100",
                        time_scale=o.sim_time_scale, python=sys.executable if engine == "sim" else o.engine_python,
                        extra_args=tuple(o.engine_args), extra_env=tuple(o.engine_env),
                        max_model_len=o.max_model_len, dummy_weights=o.dummy_weights)
        spec = TrialSpec(number=number, engine=engine, space=self.spaces[engine], launch=launch,
                         requests=o.requests, out_dir=self.run_dir.resolve(), endpoint=o.endpoint,
                         concurrency=o.concurrency, max_concurrency=o.max_concurrency,
                         warmup_requests=o.warmup_requests, vocab_size=o.vocab_size, slo=o.slo,
                         startup_timeout_s=o.startup_timeout_s)
        if study is not None and not baseline:
            spec.watchers = self._watchers(study, spec)
        return spec

    def _watchers(self, study: optuna.Study, spec: TrialSpec) -> list[Any]:
        o = self.options
        watchers: list[Any] = []
        if o.slo is not None and (o.prune or o.halving):
            open_loop = o.concurrency is None
            span_s = o.requests[-1].arrival_s - o.requests[0].arrival_s if open_loop else None
            best = max((p.summary.get("goodput") or 0.0 for p in completed_points(study) if p.feasible),
                       default=0.0) if o.halving else 0.0
            watchers.append(SloPruner(o.slo, len(o.requests), best_goodput=best or None, span_s=span_s))
        if o.halving:
            clock = get_engine(spec.engine).clock_scale(spec.launch)
            watchers.append(RungWatch(copy.deepcopy(self.halving), o.requests, o.slo, clock_scale=clock))
        return watchers

    def _record(self, study: optuna.Study, spec: TrialSpec, outcome: TrialOutcome | None, error: str,
                total: int) -> None:
        number = spec.number
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        storage = study._storage
        self.measured += 1
        if outcome is None:  # the trial raised inside its actor (a lost actor goes through _record_lost)
            outcome = TrialOutcome(number=number, ok=False, command=[], failure=FailureClass.CRASH,
                                   message=f"trial raised in its actor: {error}")
        self.trial_wall.append(outcome.ended_at - outcome.started_at)
        storage.set_trial_user_attr(trial_id, "command", outcome.command)
        storage.set_trial_user_attr(trial_id, "wall_s", round(outcome.ended_at - outcome.started_at, 2))
        storage.set_trial_user_attr(trial_id, "ready_s", round(outcome.ready_s, 2))
        storage.set_trial_user_attr(trial_id, "teardown", {"port_released": outcome.port_released,
                                                           "gpu_memory_released": outcome.gpu_memory_released})
        watch = next((w for w in outcome.watchers if isinstance(w, RungWatch)), None)
        if watch is not None:
            for rung, score in enumerate(watch.scores):
                self.halving.record(rung, score)
            storage.set_trial_user_attr(trial_id, "rung_scores", rung_scores_attr(watch.scores))
        if outcome.ok and outcome.stopped:
            text = self._record_stopped(study, spec, outcome, trial_id)
        elif outcome.ok:
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
            state = "PRUNED" if outcome.stopped else "COMPLETE" if outcome.ok else "FAIL"
            self.tracker.log_trial(number, spec.engine, spec.launch.config, outcome.command, state,
                                   outcome.summary, outcome.engine_metrics,
                                   self._tags(spec.engine), outcome.failure, outcome.message,
                                   [outcome.log_path, outcome.rows_csv, outcome.summary_json])
        self._progress(study, number, text, total)

    def _record_stopped(self, study: optuna.Study, spec: TrialSpec, outcome: TrialOutcome, trial_id: int) -> str:
        """A trial a watcher stopped: PRUNED, with why, what it had measured, and its SLO constraints so
        that the samplers still learn how far it was from the SLO."""
        o, storage = self.options, study._storage
        pruner = next((w for w in outcome.watchers if isinstance(w, SloPruner)), None)
        watch = next((w for w in outcome.watchers if isinstance(w, RungWatch)), None)
        stopped = dict(outcome.stopped or {})
        clock = get_engine(spec.engine).clock_scale(spec.launch)
        # a full replay lasts at least until the last scheduled arrival, and about as long as the defaults'
        defaults_s = [t.user_attrs["measure_s"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if t.user_attrs.get("baseline") and "measure_s" in t.user_attrs]
        full_s = max([(o.requests[-1].arrival_s - o.requests[0].arrival_s) / clock, *defaults_s])
        rest_s = max(0.0, full_s - stopped["elapsed_s"])
        stopped["saved_gpu_s"] = round(rest_s * gpus_needed(spec.launch.config), 3)
        self.saved_gpu_s += stopped["saved_gpu_s"]
        self.stopped += 1
        constraints = stopped_constraints(o.slo, pruner, watch) if o.slo else {}
        storage.set_trial_user_attr(trial_id, "stopped", stopped)
        storage.set_trial_user_attr(trial_id, "message", stopped["reason"])
        storage.set_trial_user_attr(trial_id, "summary", outcome.summary)
        storage.set_trial_user_attr(trial_id, "engine_metrics", outcome.engine_metrics)
        storage.set_trial_user_attr(trial_id, "constraints", list(constraints.values()))
        live_trial = optuna.trial.Trial(study, trial_id)
        for name, value in constraints.items():
            live_trial.set_constraint(name, value)
        study.tell(spec.number, state=TrialState.PRUNED)
        return f"PRUNED after {stopped['finished']}/{len(o.requests)} requests ({stopped['kind']}: {stopped['reason']})"

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

            self.tracker = StudyTracker(o.mlflow_uri, "servetune", o.study_name,
                                        self.run_dir / "mlflow-buffer.jsonl", say=self.say)
            self.tracker.log_study({"workload": o.workload, "model": o.model, "engines": ",".join(o.engines),
                                    "gpus": o.gpus, "objectives": ",".join(o.objectives.names),
                                    "slo": str(o.slo) if o.slo else "", "sampler": o.sampler,
                                    "optuna_storage": o.storage},
                                   {"trace_sha256": o.workload_digest,
                                    "simulated": str(o.engines == ["sim"]).lower()})
        self.halving = SuccessiveHalving.from_study(study, eta=o.eta)
        already = _finished(study)
        if o.trials is not None and already >= o.trials:
            self.say(f"study '{o.study_name}' already has {already} finished trials (asked for {o.trials})")
            if not (o.finalists or o.capacity):
                return study
        if o.ray_address:
            for note in cluster_notes(o.storage, o.mlflow_uri):
                self.say(f"note: {note}")
        init_ray(o.ray_address, o.gpus)
        pool = TrialPool(o.gpus, shared_cluster=bool(o.ray_address), name_prefix=f"servetune:{o.study_name}")
        if pool.total_gpus < 1:
            raise InputError(f"the Ray cluster at {o.ray_address} has no GPU", field="ray-address")
        if pool.total_gpus < o.gpus:
            self.say(f"note: the Ray cluster has {pool.total_gpus} GPU(s); using those, not {o.gpus}")
        pending: list[_Proposal] = []  # asked, waiting for GPUs on one node
        lookahead = self.lookahead or max(2, LOOKAHEAD_PER_GPU * pool.total_gpus)
        self.pass_over_limit = max(4, PASS_OVER_PER_GPU * pool.total_gpus)
        rejected = 0
        deadline = self.started + o.budget_s if o.budget_s else None
        self.say(f"study '{o.study_name}': {already} trials done, running up to "
                 f"{(o.trials or 0) - already if o.trials else 'unbounded'} more on {pool.total_gpus} GPU(s)"
                 f"{f' of {len(pool.node_gpus)} nodes' if len(pool.node_gpus) > 1 else ''}, "
                 f"engine(s) {', '.join(o.engines)}{' (SIMULATED)' if o.engines == ['sim'] else ''}")
        self.campaign = Campaign(gpus=pool.total_gpus, started_at=time.time())
        try:
            while True:
                self._launch_fitting(study, pending, pool)
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if out_of_time and pending:
                    self._put_back(study, pending)
                wanted = not out_of_time and rejected <= MAX_REJECTED_PER_TRIAL * max(1, o.trials or 1) and (
                    o.trials is None or _finished(study) + len(pool) + len(pending) < o.trials)
                reserved = any(p.passed_over >= self.pass_over_limit for p in pending)
                if wanted and pool.free_gpus > 0 and len(pending) < lookahead and not reserved:
                    proposal = self._propose(study, pool.largest_node)
                    if proposal is None:
                        rejected += 1
                    else:
                        pending.append(proposal)
                    continue
                if not wanted and not pending and not len(pool):
                    break
                self._collect(study, pool, pending, total)
            self._finals(study, pool)
        finally:
            pool.close()
            if rejected - self.avoided:
                self.say(f"{rejected - self.avoided} proposed configuration(s) broke a known constraint and "
                         "never launched")
            if self.avoided:
                self.say(f"{self.avoided} launch(es) avoided: predicted to fail like configurations that did")
            if self.stopped:
                self.say(f"{self.stopped} trial(s) stopped early (SLO certainly lost, beaten, or screened out); "
                         f"about {self.saved_gpu_s:.1f} GPU-s of replay not run (against the defaults' full replay)")
        self._report_campaign(study)
        return study

    def _propose(self, study: optuna.Study, largest_node: int) -> _Proposal | None:
        """Ask Optuna for a configuration; None when a known constraint rejects it (recorded as such)."""
        trial = study.ask()
        baseline = bool(trial.user_attrs.get("baseline"))
        engine, config = suggest_config(trial, self.spaces, baseline)
        trial.set_user_attr("engine", engine)
        trial.set_user_attr("config", config)
        need = gpus_needed(config)
        reasons = violations(config, self.context)
        if not reasons and need > largest_node:
            reasons = [f"TP×PP×DP = {need} GPUs must share one node; the largest node has {largest_node}"]
        if reasons:
            trial.set_user_attr("failure", FailureClass.CONSTRAINT)
            trial.set_user_attr("message", "; ".join(reasons))
            study.tell(trial, state=TrialState.FAIL)
            return None
        if not baseline:  # hidden constraints: like configurations that failed on a server
            model = FeasibilityModel(self.spaces[engine]).fit(observations_from_study(study, engine))
            verdict = model.verdict(config)
            if not verdict.launch:
                tell_infeasible(study, trial, PREDICTED_INFEASIBLE, verdict.reason, verdict.p_fail)
                self.avoided += 1
                return None
        return _Proposal(trial.number, engine, config, baseline, need)

    def _launch_fitting(self, study: optuna.Study, pending: list[_Proposal], pool: TrialPool) -> None:
        """Launch, oldest first, every pending proposal that fits now. One that smaller ones passed over
        `pass_over_limit` times holds back those behind it until it fits, so a large trial is not starved."""
        waiting: list[_Proposal] = []
        for proposal in list(pending):
            if any(w.passed_over >= self.pass_over_limit for w in waiting):
                break
            if pool.fits(proposal.need):
                study._storage.set_trial_user_attr(study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, proposal.number), "launched_at", time.time())
                pool.submit(self._trial_spec(proposal.number, proposal.engine, proposal.config, proposal.baseline,
                                             study), proposal.need)
                pending.remove(proposal)
                for w in waiting:
                    w.passed_over += 1
            else:
                waiting.append(proposal)

    def _put_back(self, study: optuna.Study, pending: list[_Proposal]) -> None:
        """Out of time: proposals never launched are marked interrupted and queued for a resumed run."""
        for proposal in pending:
            trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, proposal.number))
            study._storage.set_trial_user_attr(trial._trial_id, "failure", FailureClass.INTERRUPTED)
            study.tell(proposal.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"baseline": True} if proposal.baseline else {},
                                skip_if_exists=False)
        pending.clear()

    def _collect(self, study: optuna.Study, pool: TrialPool, pending: list[_Proposal], total: int) -> None:
        """Record the next trial to finish; with none of ours running, wait for GPUs others hold."""
        if not len(pool):
            if not pool.wait_for_room(min((p.need for p in pending), default=1)):
                self.say("waiting for GPUs that other jobs on the Ray cluster hold")
            return
        self._show_live(pool)
        finished = pool.wait_one(timeout_s=5.0 if pool.shared_cluster else LIVE_REFRESH_S)
        if finished is None:
            return
        self._record_placement(study, finished)
        if finished.lost:
            self._record_lost(study, finished, total)
        else:
            self._record(study, finished.spec, finished.outcome, finished.error, total)

    def _record_placement(self, study: optuna.Study, finished: Finished) -> None:
        """Where and when the trial ran (user attrs, and a span of this campaign's schedule)."""
        spec, outcome, where = finished.spec, finished.outcome, finished.placement
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, spec.number)
        gpus = gpus_needed(spec.launch.config)
        attrs: dict[str, Any] = {"gpus": gpus, "node": finished.node_id or (where.node_id if where else "")}
        if where is not None:
            attrs.update(gpu_ids=list(where.gpu_ids), cuda_visible_devices=where.cuda_visible_devices,
                         nvlink=where.nvlink)
        if outcome is not None:
            clock = get_engine(spec.engine).clock_scale(spec.launch)
            measure_s = (outcome.summary.get("duration_s") or 0.0) / clock
            attrs.update(started_at=outcome.started_at, ended_at=outcome.ended_at, measure_s=round(measure_s, 3))
            self.campaign.spans.append(TrialSpan(
                number=spec.number, gpus=gpus, gpu_ids=where.gpu_ids if where else (), node_id=attrs["node"],
                started_at=outcome.started_at, ready_s=outcome.ready_s, measure_s=measure_s,
                ended_at=outcome.ended_at, ok=outcome.ok))
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(trial_id, key, value)

    def _record_lost(self, study: optuna.Study, finished: Finished, total: int) -> None:
        """The actor or its node died mid-trial: fail the trial with the cause and queue its configuration
        once more (Ray places it again, elsewhere if the node is gone); a second loss stays failed."""
        spec = finished.spec
        storage = study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, spec.number)
        trial = storage.get_trial(trial_id)
        again = "requeued_from" not in trial.user_attrs
        if again:
            storage.set_trial_user_attr(trial_id, "requeued", True)
            study.enqueue_trial(trial.params, skip_if_exists=False, user_attrs={
                "requeued_from": spec.number, **({"baseline": True} if trial.user_attrs.get("baseline") else {})})
        reaped = f"; killed {len(finished.reaped)} leftover server process(es)" if finished.reaped else ""
        message = (f"trial actor lost ({finished.error}){reaped}; "
                   + ("its configuration is queued to run again" if again else "lost twice, not retried"))
        from tuner.runner.pool import LOST

        outcome = TrialOutcome(number=spec.number, ok=False, command=[], failure=LOST, message=message)
        self._record(study, spec, outcome, finished.error, total)

    # --- after the search ------------------------------------------------------------------------
    def _finals(self, study: optuna.Study, pool: TrialPool) -> None:
        """The best configurations measured again, `repeats` times with re-timed arrivals (mean and 95%
        CI), and with `capacity` searched for the highest rate each sustains within the SLO. Results go to
        the study's user attribute `finals` (trial number -> `remeasured`, `capacity`); a rerun does not redo them."""
        o = self.options
        count = o.finalists or (3 if o.capacity else 0)
        chosen = finalists(completed_points(study), count) if count else []
        if not chosen:
            if count:
                self.say("no completed trial to measure again")
            return
        finals: dict[str, dict[str, Any]] = dict(study.user_attrs.get("finals", {}))
        seed = (o.seed or 0) + 1000
        span_s = o.requests[-1].arrival_s - o.requests[0].arrival_s
        runs: list[TrialSpec] = []
        for point in chosen:
            if gpus_needed(point.config) > pool.largest_node:
                self.say(f"note: trial {point.number} needs more GPUs than one node now has; not measured again")
                continue
            done = finals.get(str(point.number), {})
            if o.finalists and "remeasured" not in done:
                for k in range(o.repeats):
                    spec = self._trial_spec(point.number, point.engine, point.config, point.baseline)
                    spec.requests, spec.label = retimed(o.requests, seed + k), f"repeat-{k + 1}"
                    runs.append(spec)
            if o.capacity and "capacity" not in done and o.slo is not None and span_s > 0:
                spec = self._trial_spec(point.number, point.engine, point.config, point.baseline)
                spec.label = "capacity"
                spec.measure = CapacitySearch(o.slo, start=(len(o.requests) - 1) / span_s,
                                              attainment=o.attainment, seed=seed)
                runs.append(spec)
        if runs:
            again = sum(1 for spec in runs if spec.label != "capacity")
            self.say(f"\nfinalists: trials {', '.join(str(p.number) for p in chosen)}: {again} re-timed replay(s), "
                     f"{len(runs) - again} capacity search(es)")
        repeats: dict[int, list[TrialOutcome | None]] = {}
        for spec, outcome in self._run_all(pool, runs):
            if spec.label != "capacity":
                repeats.setdefault(spec.number, []).append(outcome)
            elif outcome is not None and outcome.ok:
                finals.setdefault(str(spec.number), {})["capacity"] = outcome.measured.as_attrs()
        for number, outcomes in repeats.items():
            summaries = [r.summary for r in outcomes if r is not None and r.ok]
            if summaries:
                finals.setdefault(str(number), {})["remeasured"] = {
                    "repeats": len(summaries), "failed": len(outcomes) - len(summaries),
                    "estimates": {k: {"mean": e.mean, "low": e.low, "high": e.high, "values": list(e.values)}
                                  for k, e in estimates_of(summaries).items()}}
        study.set_user_attr("finals", finals)

    def _run_all(self, pool: TrialPool, specs: list[TrialSpec]) -> list[tuple[TrialSpec, TrialOutcome | None]]:
        """Run `specs` on the pool, as many at once as the GPUs allow; (spec, outcome or None) in finishing order."""
        queue, done = list(specs), []
        while queue or len(pool):
            while queue and pool.fits(gpus_needed(queue[0].launch.config)):
                spec = queue.pop(0)
                pool.submit(spec, gpus_needed(spec.launch.config))
            if not len(pool):
                pool.wait_for_room(gpus_needed(queue[0].launch.config))
                continue
            finished = pool.wait_one(timeout_s=5.0 if pool.shared_cluster else None)
            if finished is None:
                continue
            done.append((finished.spec, finished.outcome))
            outcome = finished.outcome
            text = ("lost or raised: " + finished.error if outcome is None
                    else f"FAILED ({outcome.failure}: {outcome.message})" if not outcome.ok
                    else f"capacity {outcome.measured}" if outcome.measured is not None
                    else f"{outcome.summary.get('output_throughput', 0):.0f} tok/s")
            self.say(f"[finalists {len(done)}/{len(specs)}] trial {finished.spec.number} "
                     f"{finished.spec.label}: {text}")
        return done

    def _report_campaign(self, study: optuna.Study) -> None:
        campaign = self.campaign
        if not campaign.spans:
            return
        campaign.ended_at = max(time.time(), max(s.ended_at for s in campaign.spans))
        campaign.write_json(self.run_dir / "campaign.json")
        everything = with_earlier_trials(campaign, study.get_trials(deepcopy=False))  # across resumes
        title = f"{self.options.study_name}: schedule of {len(everything.spans)} trials on {campaign.gpus} GPU(s)"
        png = gantt_png(everything, self.run_dir / "schedule.png", title)
        s = campaign.summary()
        self.say(f"\ncampaign: {s['trials']} trials in {_fmt_duration(s['wall_s'])} on {s['gpus']} GPU(s); "
                 f"GPU utilisation {s['utilisation']:.2f} (measuring / held), GPUs inside trials "
                 f"{s['packing']:.2f}; schedule: {png}")

    # --- results -----------------------------------------------------------------------------
    def report(self, study: optuna.Study) -> dict[str, Any]:
        """The study's report (tuner.report): printed, written beside the trials, logged to MLflow."""
        from tuner.report.write import write_study_report

        report = write_study_report(study, self.run_dir, run_dir=self.run_dir)
        self.say(report.console)
        if report.result.points:
            self.say(f"\nreport: {report.files[0]}\nplots: {'  '.join(str(f) for f in report.files[1:])}")
        if self.tracker is not None:
            self.tracker.log_study_artifacts(report.files, report.metrics)
            self.tracker.finish()
        return report.metrics
