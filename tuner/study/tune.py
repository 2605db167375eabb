"""The tuning loop: Optuna proposes, Ray actors measure, MLflow records, the Pareto front comes out."""

from __future__ import annotations

import copy
import itertools
import random
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from tuner.engines import get_engine, is_simulated
from tuner.engines.base import Launch
from tuner.errors import InputError
from tuner.hardware.gpus import get_gpu
from tuner.loadgen.slo import SLO
from tuner.metrics import metric
from tuner.models.shapes import ModelShape
from tuner.outcome import Outcome, missing_module
from tuner.records.objectives import Objectives, default_objectives, slo_constraints
from tuner.records.pareto import Point, completed_points, pick
from tuner.records.reliability import unreliable_reasons
from tuner.records.storage import cluster_notes, open_store
from tuner.runner.campaign import Campaign, TrialSpan, gantt_png, with_earlier_trials
from tuner.runner.progress import LiveLines, eta_s
from tuner.runner.server import ForkServer, RunningForkServer, start_fork_server
from tuner.runner.trial import TrialOutcome, TrialSpec
from tuner.space.constraints import Context, gpus_needed, violations
from tuner.space.fit import drop_for_study, fit_to_model, fit_to_weights, preflight, unavailable_in
from tuner.space.knobs import SearchSpace, load_space
from tuner.study.feasibility import (
    PREDICTED_INFEASIBLE,
    FeasibilityModel,
    observations_from_study,
    tell_infeasible,
)
from tuner.study.fidelity import (
    RungWatch,
    SuccessiveHalving,
    rung_scores_attr,
    stopped_constraints,
)
from tuner.study.finals import Finals
from tuner.study.prescreen import make_prescreen
from tuner.study.pruning import SloPruner
from tuner.study.sampling import every_engines_defaults, suggest_config
from tuner.study.scheduler import MAX_REJECTED_PER_TRIAL, Proposal, Scheduler
from tuner.study.session import StudySession
from tuner.workload.request import TraceRequest

if TYPE_CHECKING:
    from tuner.runner.pool import Finished, TrialPool

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
    objectives: Objectives | None = None  # None: default_objectives(slo, per GPU when gpus > 1)
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
    fix_by: dict[str, list[str]] = field(default_factory=dict)  # engine -> KNOB=VALUE held for that engine only
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
    # per engine, over the above (vLLM and SGLang seldom share a virtualenv; their flags differ)
    engine_pythons: dict[str, str] = field(default_factory=dict)
    engine_args_by: dict[str, list[str]] = field(default_factory=dict)
    engine_env_by: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    vocab_size: int = 32000
    max_model_len: int | None = None
    dummy_weights: bool = False
    quiet: bool = False
    prune: bool = True  # with an SLO: stop a trial as soon as its SLO is certainly lost
    cold_start: bool = False  # never fork servers from a fork server that preloaded the engine
    halving: bool = False  # successive halving over trace length; stop trials that cannot beat the best
    eta: float = 2.0
    finalists: int = 0  # best configurations measured again after the search
    repeats: int = 3  # re-measurements per finalist, each with other arrival times
    capacity: bool = False  # with an SLO: highest request rate each finalist sustains, by bisection
    attainment: float = 0.99  # fraction of requests that must meet the SLO for a rate to hold
    prescreen: str = "off"  # sim: the calibrated simulator screens proposals (tuner/study/prescreen.py)
    prescreen_keep: float = 0.25  # share of the simulator's predictions that may launch
    selection: dict[str, Any] = field(default_factory=dict)  # how `requests` were sliced from `workload`

    def python_for(self, engine: str) -> str:
        return sys.executable if get_engine(engine).simulated else self.engine_pythons.get(engine, self.engine_python)

    def args_for(self, engine: str) -> list[str]:
        return [*self.engine_args, *self.engine_args_by.get(engine, [])]

    def env_for(self, engine: str) -> list[tuple[str, str]]:
        return [*self.engine_env, *self.engine_env_by.get(engine, [])]


def build_spaces(options: TuneOptions) -> dict[str, SearchSpace]:
    spaces = {}
    for engine in options.engines:
        space = load_space(options.space_path if options.space_path and len(options.engines) == 1 else engine)
        for item in [*options.fix, *options.fix_by.get(engine, [])]:
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
    """SLO constraints reach the samplers through Trial.set_constraint, except with a goodput objective
    (see Tuner._sampler_constraints)."""
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


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Tuner:
    lookahead: int | None = None  # proposals that may wait for GPUs; 1 = strict order (no packing)

    def __init__(self, options: TuneOptions) -> None:
        self.options = options
        self.objectives = options.objectives or default_objectives(options.slo, per_gpu=options.gpus > 1)
        if self.objectives.needs_slo and options.slo is None:
            raise InputError(f"objective {self.objectives.primary} needs an SLO: give --slo", field="objective")
        self.live_lines, self.slots = LiveLines(), 1  # running trials' lines; most trials seen running at once
        self.fork_servers: dict[str, ForkServer] = {}  # engine: where its fork server listens (see run)
        self.guess_next = False  # a new study with --prescreen: the simulator's best guesses follow the defaults
        self.guesses: Future | None = None
        self.stop_guessing = threading.Event()
        self.spaces = build_spaces(options)
        self.engine_versions: dict[str, str] = {}
        for engine, space in self.spaces.items():
            self._fit_space_to_installed(engine, space)
            model = options.shape or options.model
            for note in (fit_to_model(space, model) if model else []) + fit_to_weights(space, options.dummy_weights):
                self.say(f"note: {note}")
            if not get_engine(engine).simulated:
                for note in preflight(space, options.python_for(engine)):
                    self.say(f"note: {note}")
        gpu_spec = get_gpu(options.gpu) if options.gpu else None
        self.context = Context(gpus=options.gpus, gpu=gpu_spec, model=options.shape,
                               max_model_len=options.max_model_len)
        self.run_dir = options.out_dir / options.study_name
        self.tracker: Any = None
        self.session: StudySession | None = None
        self.started = time.monotonic()
        self.trial_wall: list[float] = []
        self.measured = 0
        self.avoided = 0  # proposals the feasibility model kept off the GPUs
        self.excluded_hits = 0  # proposals holding a value that left the space (environment failure)
        self.halving = SuccessiveHalving(eta=options.eta)
        self.stopped = 0  # trials stopped early this run
        self.saved_gpu_s = 0.0  # replay time that trials stopped early did not run, times their GPUs
        requests = options.requests
        span = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 0.0
        self.offered_rate = (len(requests) - 1) / span if span > 0 and options.concurrency is None else 0.0
        self.prescreen = make_prescreen(options, self.engine_versions, self.run_dir, self.say)

    def _fit_space_to_installed(self, engine: str, space: SearchSpace) -> None:
        from tuner.engines.probe import drop_unsupported, flags_in, probe_help

        adapter = get_engine(engine)
        python = self.options.python_for(engine)
        help_argv = adapter.help_argv(python)
        if help_argv is None:
            self.engine_versions[engine] = adapter.version(python)
            return
        version = adapter.version(python)
        if version == "unknown":
            raise InputError(f"{engine} is not importable by {python}; install it there "
                             f"or pass --engine-python {engine}=PYTHON", field="engine-python")
        self.engine_versions[engine] = version
        for note in drop_unsupported(space, flags_in(probe_help(engine, version, help_argv))):
            self.say(f"note: {note}")

    # --- Optuna -----------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        o = self.options
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        parallel = o.gpus > 1
        study = optuna.create_study(study_name=o.study_name, storage=open_store(o.storage),
                                    directions=self.objectives.directions, load_if_exists=True,
                                    sampler=make_sampler(o.sampler, parallel, o.seed, self.spaces))
        if study.trials and o.seed is not None:
            # a resumed study must not replay the first run's proposals: move the seed on
            study.sampler = make_sampler(o.sampler, parallel, o.seed + len(study.trials), self.spaces)
        self.session = session = StudySession(study)
        stored = session.record().objectives
        if stored and o.objectives is None and stored != list(self.objectives.names):
            self.say(f"note: study '{o.study_name}' keeps the objectives it was created with: {', '.join(stored)}")
            self.objectives = Objectives(tuple(stored))
        if stored and stored != list(self.objectives.names):
            raise InputError(f"study '{o.study_name}' was created with objectives {stored}, not "
                             f"{list(self.objectives.names)}; use another --study-name", field="study-name")
        versions = {**session.record().engine_versions, **self.engine_versions}
        session.save_study(objectives=list(self.objectives.names), engines=o.engines, model=o.model,
                           workload=str(o.workload), workload_digest=o.workload_digest, gpus=o.gpus,
                           slo=str(o.slo) if o.slo else "", spaces={e: s.source for e, s in self.spaces.items()},
                           engine_versions=versions, offered_rate=self.offered_rate,
                           engine_args=list(o.engine_args),  # exports drop the machine-specific ones
                           engine_args_by_engine={e: o.args_for(e) for e in o.engines},
                           selection=dict(o.selection),
                           **({"gpu": o.gpu} if o.gpu else {}))
        recovered = session.recover_interrupted()
        if recovered:
            self.say(f"resuming: {recovered} interrupted trial(s) will run again")
        if not study.trials:
            for params in every_engines_defaults(self.spaces):
                study.enqueue_trial(params, user_attrs={"baseline": True})
            if o.sampler == "grid":
                grid = grid_of(self.spaces)
                points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
                random.Random(o.seed).shuffle(points)
                for params in points:
                    study.enqueue_trial(params)
            else:
                self.guess_next = self.prescreen is not None
        for knob, value, reason in session.record().excluded:
            for space in self.spaces.values():
                if knob in space.knobs:
                    space.unavailable[(knob, str(value))] = reason
            self.say(f"note: {knob}={value} is out of the space: {reason}")
        return study

    @property
    def _session(self) -> StudySession:
        assert self.session is not None, "open_study() first"
        return self.session

    # --- output ------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.options.quiet:
            self.live_lines.clear()
            print(text, flush=True)

    def _best(self) -> Point | None:
        return pick(completed_points(self._session.study), self.objectives, offered_rate=self.offered_rate)

    def _show_live(self, pool: TrialPool) -> None:
        """One line per running trial, from the progress files the trials write (tuner.runner.progress)."""
        self.slots = max(self.slots, len(pool))
        if not self.options.quiet:
            self.live_lines.show([item.spec.out_dir / item.spec.run_name for item in pool.running.values()])

    def _progress(self, number: int, outcome_text: str, total: int) -> None:
        done = self._session.finished()
        best = self._best()
        if best is None:
            best_text = "no result yet"
        else:
            m = metric(self.objectives.primary)
            value = best.get(m.name)
            best_text = (f"best {'-' if value is None else f'{value:.4g}'} {m.unit} (#{best.number}"
                         f"{'' if best.feasible else ', misses SLO'})")
        left = eta_s([s for s in self.trial_wall if s > 0], total - done, self.slots) if total else None
        eta = f" | ETA {_fmt_duration(left)}" if left is not None else ""
        self.say(f"[{done}/{total or '?'}] trial {number}: {outcome_text} | {best_text}{eta}")

    # --- trials ------------------------------------------------------------------------------
    def _start_fork_servers(self) -> list[RunningForkServer]:
        """One fork server per engine that preloads (servers on this machine are forked from it); none with
        --cold-start. Its log is the run folder's fork-server-<engine>.log."""
        running = []
        for engine in self.options.engines:
            adapter = get_engine(engine)
            if self.options.cold_start or adapter.simulated or not adapter.preload_modules:
                continue
            try:
                fork = start_fork_server(self.options.python_for(engine), adapter.preload_modules,
                                         self.run_dir / f"fork-server-{engine}.log")
            except OSError as exc:
                self.say(f"note: {engine} servers start cold: no fork server ({exc})")
                continue
            self.fork_servers[engine] = fork.address
            running.append(fork)
        return running

    def _trial_spec(self, number: int, engine: str, config: dict[str, Any], baseline: bool,
                    watch: bool = False) -> TrialSpec:
        """`watch`: give the trial the watchers that may stop it early (never the defaults baseline)."""
        o = self.options
        launch = Launch(config=config, model=o.model, baseline=baseline, host=o.host, gpu=o.gpu or "h100",
                        time_scale=o.sim_time_scale,
                        python=o.python_for(engine), extra_args=tuple(o.args_for(engine)),
                        extra_env=tuple(o.env_for(engine)),
                        max_model_len=o.max_model_len, dummy_weights=o.dummy_weights)
        spec = TrialSpec(number=number, engine=engine, space=self.spaces[engine], launch=launch,
                         requests=o.requests, out_dir=self.run_dir.resolve(), endpoint=o.endpoint,
                         concurrency=o.concurrency, max_concurrency=o.max_concurrency,
                         warmup_requests=o.warmup_requests, vocab_size=o.vocab_size, slo=o.slo,
                         startup_timeout_s=o.startup_timeout_s,
                         fork_server=self.fork_servers.get(engine))
        if watch and not baseline:
            spec.watchers = self._watchers(spec)
        return spec

    def _watchers(self, spec: TrialSpec) -> list[Any]:
        """Early stopping that never throws away a better answer: the dominance bound against the best final
        goodput (SLO-meeting trials' while one exists), "SLO certainly lost" only once a trial meets the SLO,
        and the successive-halving rungs (the same trace prefix for every trial)."""
        o = self.options
        watchers: list[Any] = []
        if o.slo is not None and (o.prune or o.halving):
            open_loop = o.concurrency is None
            span_s = o.requests[-1].arrival_s - o.requests[0].arrival_s if open_loop else None
            points = completed_points(self._session.study)
            points = [p for p in points if not p.unreliable] or points
            feasible = [p for p in points if p.feasible]
            per_gpu = max(((p.summary.get("goodput") or 0.0) / max(1, p.gpus) for p in feasible or points),
                          default=0.0)
            best = per_gpu * gpus_needed(spec.launch.config)
            watchers.append(SloPruner(o.slo, len(o.requests), best_goodput=best or None, span_s=span_s,
                                      stop_on_slo_lost=bool(feasible)))
        if o.halving:
            clock = get_engine(spec.engine).clock_scale(spec.launch)
            watchers.append(RungWatch(copy.deepcopy(self.halving), o.requests, o.slo, clock_scale=clock))
        return watchers

    def _record(self, spec: TrialSpec, outcome: TrialOutcome | None, error: str, total: int) -> None:
        number, session = spec.number, self._session
        self.measured += 1
        if outcome is None:  # the trial raised inside its actor (a lost actor goes through _record_lost)
            outcome = TrialOutcome(number=number, ok=False, command=[], failure=Outcome.CRASH,
                                   message=f"trial raised in its actor: {error}")
        self.trial_wall.append(outcome.ended_at - outcome.started_at)
        session.save(number, command=outcome.command, wall_s=round(outcome.ended_at - outcome.started_at, 2),
                     ready_s=round(outcome.ready_s, 2),
                     teardown={"port_released": outcome.port_released,
                               "gpu_memory_released": outcome.gpu_memory_released},
                     startup_phases=getattr(outcome, "startup_phases", None) or {},
                     forked=outcome.forked)
        watch = next((w for w in outcome.watchers if isinstance(w, RungWatch)), None)
        if watch is not None:
            for rung, score in enumerate(watch.scores):
                self.halving.record(rung, score)
            session.save(number, rung_scores=rung_scores_attr(watch.scores))
        if outcome.ok and outcome.stopped:
            text = self._record_stopped(spec, outcome)
        elif outcome.ok:
            gpus = gpus_needed(spec.launch.config)
            values = self.objectives.values(outcome.summary, gpus)
            constraints = slo_constraints(self.options.slo, outcome.summary)
            unreliable = unreliable_reasons(outcome.summary, outcome.engine_metrics)
            session.save(number, summary=outcome.summary, engine_metrics=outcome.engine_metrics,
                         constraints=constraints, unreliable=unreliable)
            session.tell_values(number, values, self._sampler_constraints(dict(zip(
                (t.name for t in self.options.slo.targets) if self.options.slo else (), constraints))))
            shown = " ".join(f"{n} {v:.4g}" for n, v in zip(self.objectives.names, values))
            text = shown + (" (misses SLO)" if any(c > 0 for c in constraints) else "") + (
                f" UNRELIABLE ({'; '.join(unreliable)})" if unreliable else "")
        else:
            session.tell_failed(number, outcome.failure or Outcome.CRASH, outcome.message,
                                log_tail=outcome.log_tail[-4000:])
            text = f"FAILED ({outcome.failure}: {outcome.message})"
            if outcome.failure == Outcome.ENVIRONMENT:
                self._exclude_missing_module(spec, outcome.message + "\n" + outcome.log_tail)
        if self.tracker is not None:
            state = "PRUNED" if outcome.stopped else "COMPLETE" if outcome.ok else "FAIL"
            self.tracker.log_trial(number, spec.engine, spec.launch.config, outcome.command, state,
                                   outcome.summary, outcome.engine_metrics,
                                   self._tags(spec.engine), outcome.failure, outcome.message,
                                   [outcome.log_path, outcome.rows_csv, outcome.summary_json])
        self._progress(number, text, total)

    def _sampler_constraints(self, constraints: dict[str, float]) -> dict[str, float]:
        """The SLO constraints the sampler sees. With a goodput objective, none: goodput already counts the
        SLO request by request, and Optuna's samplers rank trials that all miss a constraint by their summed
        violation alone, so a study whose SLO nothing meets would chase the smallest TTFT excess instead of
        goodput (experiments/benchmarks/goodput_first.md). The values are stored either way
        (`TrialRecord.constraints`) and decide the recommendation."""
        return {} if self.objectives.needs_slo else constraints

    def _exclude_missing_module(self, spec: TrialSpec, text: str) -> None:
        """An engine install that lacks a module: the knob values that need it (`needs:` in the space; without
        such a mark, the trial's non-default quantization, attention backend or speculative method) are not
        proposed again in this study, resumed runs included (`StudyRecord.excluded`)."""
        module = missing_module(text)
        if module is None:
            return
        space = self.spaces[spec.engine]
        drop_for_study(space, spec.launch.config, module)
        if not unavailable_in(space, spec.launch.config):
            for name in ("quantization", "attention_backend", "speculative_method"):
                value = spec.launch.config.get(name)
                if name in space.knobs and value is not None and str(value) != str(space.knobs[name].engine_default):
                    space.unavailable[(name, str(value))] = f"the engine's Python cannot import {module}"
        excluded = self._session.record().excluded
        for reason in unavailable_in(space, spec.launch.config):
            setting, _, why = reason.partition(": ")
            name, _, value = setting.partition("=")
            if [name, value] not in [e[:2] for e in excluded]:
                excluded.append([name, value, f"{why} (trial {spec.number})"])
                self.say(f"note: {setting} leaves the space: {why}")
        self._session.save_study(excluded=excluded)

    def _record_stopped(self, spec: TrialSpec, outcome: TrialOutcome) -> str:
        """A trial a watcher stopped: PRUNED, with why, what it had measured, and its SLO constraints so
        that the samplers still learn how far it was from the SLO."""
        o, session = self.options, self._session
        pruner = next((w for w in outcome.watchers if isinstance(w, SloPruner)), None)
        watch = next((w for w in outcome.watchers if isinstance(w, RungWatch)), None)
        stopped = dict(outcome.stopped or {})
        clock = get_engine(spec.engine).clock_scale(spec.launch)
        # a full replay lasts at least until the last scheduled arrival, and about as long as the defaults'
        defaults_s = [r.measure_s for r in session.records((TrialState.COMPLETE,)) if r.baseline and r.measure_s]
        full_s = max([(o.requests[-1].arrival_s - o.requests[0].arrival_s) / clock, *defaults_s])
        rest_s = max(0.0, full_s - stopped["elapsed_s"])
        stopped["saved_gpu_s"] = round(rest_s * gpus_needed(spec.launch.config), 3)
        self.saved_gpu_s += stopped["saved_gpu_s"]
        self.stopped += 1
        constraints = stopped_constraints(o.slo, pruner, watch) if o.slo else {}
        session.save(number := spec.number, stopped=stopped, message=stopped["reason"], summary=outcome.summary,
                     engine_metrics=outcome.engine_metrics, constraints=list(constraints.values()))
        session.tell_pruned(number, self._sampler_constraints(constraints))
        return f"PRUNED after {stopped['finished']}/{len(o.requests)} requests ({stopped['kind']}: {stopped['reason']})"

    def _tags(self, engine: str) -> dict[str, str]:
        if engine not in self.engine_versions:
            self.engine_versions[engine] = get_engine(engine).version(self.options.python_for(engine))
        return {"engine_version": self.engine_versions[engine], "gpu": self.options.gpu or "unknown",
                "gpus": str(self.options.gpus), "trace_sha256": self.options.workload_digest,
                "model": self.options.model, "simulated": str(get_engine(engine).simulated).lower()}

    def run(self) -> optuna.Study:
        o = self.options
        study = self.open_study()
        session = self._session
        total = o.trials or 0
        already = session.finished()
        finished = o.trials is not None and already >= o.trials and not (o.finalists or o.capacity)
        # a finished study is only reprinted: MLflow (seconds to import) has it already, unless records wait
        if o.mlflow_uri and (not finished or (self.run_dir / "mlflow-buffer.jsonl").exists()):
            from tuner.tracking.mlflow_log import StudyTracker

            self.tracker = StudyTracker(o.mlflow_uri, "servetune", o.study_name,
                                        self.run_dir / "mlflow-buffer.jsonl", say=self.say)
            self.tracker.log_study({"workload": o.workload, "model": o.model, "engines": ",".join(o.engines),
                                    "gpus": o.gpus, "objectives": ",".join(self.objectives.names),
                                    "slo": str(o.slo) if o.slo else "", "sampler": o.sampler,
                                    "storage": o.storage},
                                   {"trace_sha256": o.workload_digest,
                                    "simulated": str(is_simulated(o.engines)).lower()})
        self.halving = SuccessiveHalving.from_study(study, eta=o.eta)
        if o.trials is not None and already >= o.trials:
            self.say(f"study '{o.study_name}' already has {already} finished trials (asked for {o.trials})")
            if finished:
                return study
        from tuner.runner.pool import TrialPool, init_ray

        if o.ray_address:
            for note in cluster_notes(o.storage, o.mlflow_uri):
                self.say(f"note: {note}")
        init_ray(o.ray_address, o.gpus)
        running_forks = self._start_fork_servers()
        pool = TrialPool(o.gpus, shared_cluster=bool(o.ray_address), name_prefix=f"servetune:{o.study_name}")
        if pool.total_gpus < 1:
            raise InputError(f"the Ray cluster at {o.ray_address} has no GPU", field="ray-address")
        if pool.total_gpus < o.gpus:
            self.say(f"note: the Ray cluster has {pool.total_gpus} GPU(s); using those, not {o.gpus}")
        deadline = self.started + o.budget_s if o.budget_s else None
        self.say(f"study '{o.study_name}': {already} trials done, running up to "
                 f"{(o.trials or 0) - already if o.trials else 'unbounded'} more on {pool.total_gpus} GPU(s)"
                 f"{f' of {len(pool.node_gpus)} nodes' if len(pool.node_gpus) > 1 else ''}, "
                 f"engine(s) {', '.join(o.engines)}{' (SIMULATED)' if is_simulated(o.engines) else ''}; "
                 f"objective{'s' if len(self.objectives.names) > 1 else ''} {', '.join(self.objectives.names)}")
        self.campaign = Campaign(gpus=pool.total_gpus, started_at=time.time())

        def launch(proposal: Proposal) -> None:
            session.save(proposal.number, launched_at=time.time())
            pool.submit(self._trial_spec(proposal.number, proposal.engine, proposal.config, proposal.baseline,
                                         watch=True), proposal.need)

        scheduler = Scheduler(
            pool=pool, propose=self._propose, launch=launch, collect=lambda f: self._collect(f, total),
            wanted=lambda in_flight: o.trials is None or session.finished() + in_flight < o.trials,
            put_back=lambda p: session.put_back(p.number),
            max_rejected=MAX_REJECTED_PER_TRIAL * max(1, o.trials or 1), deadline=deadline,
            lookahead=self.lookahead, say=self.say, before_wait=lambda: self._show_live(pool),
            wait_s=LIVE_REFRESH_S)
        try:
            if self.guess_next:  # in a thread, while the defaults trial starts and runs
                assert self.prescreen is not None
                guess = self.prescreen.guesser(study, self.spaces, self.context, seed=o.seed, stop=self.stop_guessing)
                self.guesses = ThreadPoolExecutor(max_workers=1, thread_name_prefix="servetune-guess").submit(guess)
            scheduler.run()
            Finals(o, self.objectives, self._session, self._trial_spec, self.offered_rate, self.say,
                   on_finished=self._add_span).run(pool)
        finally:
            self.stop_guessing.set()
            pool.close()
            for fork in running_forks:
                fork.close()
            screened = self.prescreen.screened if self.prescreen is not None else 0
            never = scheduler.rejected - self.avoided - self.excluded_hits - screened
            if never:
                self.say(f"{never} proposed configuration(s) broke a known constraint and never launched")
            if self.avoided:
                self.say(f"{self.avoided} launch(es) avoided: predicted to fail like configurations that did")
            if self.excluded_hits:
                self.say(f"{self.excluded_hits} proposal(s) held a value that left the space; not launched")
            if self.stopped:
                self.say(f"{self.stopped} trial(s) stopped early (goodput bound below the best, SLO lost once "
                         f"another met it, or screened out); about {self.saved_gpu_s:.1f} GPU-s of replay not run "
                         "(against the defaults' full replay)")
        self._report_campaign(study)
        return study

    def _queue_guesses(self) -> None:
        """Once the defaults are out, queue the calibrated simulator's best guesses to come next
        (tuner.study.prescreen.Prescreen.guesser, running since the study opened)."""
        study = self._session.study
        if self.guesses is None or all(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            return
        guesses, self.guesses = self.guesses.result(), None
        for params, why in guesses:
            study.enqueue_trial(params, user_attrs={"seeded": why})
            self.say(f"queued: {why}")

    def _propose(self, largest_node: int) -> Proposal | None:
        """Ask Optuna for a configuration; None when a known constraint rejects it (recorded as such)."""
        session = self._session
        self._queue_guesses()
        trial = session.ask()
        baseline = bool(trial.user_attrs.get("baseline"))
        engine, config = suggest_config(trial, self.spaces, baseline)
        session.save(trial.number, engine=engine, config=config, gpus=gpus_needed(config))
        need = gpus_needed(config)
        reasons = violations(config, self.context)
        if not reasons and need > largest_node:
            reasons = [f"TP×PP×DP = {need} GPUs must share one node; the largest node has {largest_node}"]
        if reasons:
            session.tell_failed(trial.number, Outcome.CONSTRAINT, "; ".join(reasons))
            return None
        if not baseline:
            gone = unavailable_in(self.spaces[engine], config)
            if gone:  # tell it as infeasible so that the samplers learn to stay away
                session.live.pop(trial.number)
                tell_infeasible(session.study, trial, PREDICTED_INFEASIBLE, "left the space: " + "; ".join(gone))
                self.excluded_hits += 1
                return None
            # hidden constraints: like configurations that failed on a server
            model = FeasibilityModel(self.spaces[engine]).fit(observations_from_study(session.study, engine))
            verdict = model.verdict(config)
            if not verdict.launch:
                session.live.pop(trial.number)
                tell_infeasible(session.study, trial, PREDICTED_INFEASIBLE, verdict.reason, verdict.p_fail)
                self.avoided += 1
                return None
        if self.prescreen is not None and not self.prescreen.screen(session.study, trial, engine, config, baseline):
            session.live.pop(trial.number)
            return None
        return Proposal(trial.number, engine, config, baseline, need)

    def _collect(self, finished: Finished, total: int) -> None:
        self._record_placement(finished)
        if finished.lost:
            self._record_lost(finished, total)
        else:
            self._record(finished.spec, finished.outcome, finished.error, total)

    def _record_placement(self, finished: Finished) -> None:
        """Where and when the trial ran (record fields, and a span of this campaign's schedule)."""
        spec, where = finished.spec, finished.placement
        gpus = gpus_needed(spec.launch.config)
        attrs: dict[str, Any] = {"gpus": gpus, "node": finished.node}
        if where is not None:
            attrs.update(gpu_ids=list(where.gpu_ids), cuda_visible_devices=where.cuda_visible_devices,
                         nvlink=where.nvlink)
        span = self._add_span(finished)
        if span is not None:
            attrs.update(started_at=span.started_at, ended_at=span.ended_at, measure_s=round(span.measure_s, 3))
        self._session.save(spec.number, **attrs)

    def _add_span(self, finished: Finished) -> TrialSpan | None:
        """The run's span in this campaign's schedule (a search trial, or a finalist's re-measurement)."""
        spec, outcome, where = finished.spec, finished.outcome, finished.placement
        if outcome is None:
            return None
        measure_s = (outcome.summary.get("duration_s") or 0.0) / get_engine(spec.engine).clock_scale(spec.launch)
        span = TrialSpan(number=spec.number, gpus=gpus_needed(spec.launch.config),
                         gpu_ids=where.gpu_ids if where else (), node_id=finished.node,
                         started_at=outcome.started_at, ready_s=outcome.ready_s, measure_s=measure_s,
                         ended_at=outcome.ended_at, ok=outcome.ok, label=spec.label)
        self.campaign.spans.append(span)
        return span

    def _record_lost(self, finished: Finished, total: int) -> None:
        """The actor or its node died mid-trial: fail the trial with the cause and queue its configuration
        once more (Ray places it again, elsewhere if the node is gone); a second loss stays failed."""
        from tuner.runner.pool import LOST

        spec, session = finished.spec, self._session
        again = session.trial_record(spec.number).requeued_from is None
        if again:
            session.save(spec.number, requeued=True)
            session.requeue(spec.number, spec.number)
        reaped = f"; killed {len(finished.reaped)} leftover server process(es)" if finished.reaped else ""
        message = (f"trial actor lost ({finished.error}){reaped}; "
                   + ("its configuration is queued to run again" if again else "lost twice, not retried"))
        outcome = TrialOutcome(number=spec.number, ok=False, command=[], failure=LOST, message=message)
        self._record(spec, outcome, finished.error, total)

    def _report_campaign(self, study: optuna.Study) -> None:
        campaign = self.campaign
        if not campaign.spans:
            return
        campaign.ended_at = max(time.time(), max(s.ended_at for s in campaign.spans))
        campaign.write_json(self.run_dir / "campaign.json")
        everything = with_earlier_trials(campaign, study.get_trials(deepcopy=False))  # across resumes
        title = f"{self.options.study_name}: schedule of {len(everything.spans)} trials on {campaign.gpus} GPU(s)"
        png = gantt_png(everything, self.run_dir / "schedule.png", title) or "(none: matplotlib is not installed)"
        s = campaign.summary()
        again = f" and {s['remeasurements']} finalist re-measurement(s)" if s["remeasurements"] else ""
        self.say(f"\ncampaign: {s['trials']} trials{again} in {_fmt_duration(s['wall_s'])} on {s['gpus']} GPU(s); "
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
