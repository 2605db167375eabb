"""Which search finds a near-best configuration for the least GPU time? TPE, NSGA-II, random, ours.

Setting (SIMULATED: the performance model of `tune sim-serve`, not a GPU): Llama-3.1-8B on one H100,
the 300-request Mooncake conversation slice replayed open loop at 0.4x its speed (arrivals 2.5x
further apart, 1.2 req/s; prompts of 14k tokens on average), max_model_len 121,856 (the longest
request rounded up to 1,024, as `tune` chooses). A grid of 280 configurations is measured once with
`tuner.simulator.engine.simulate` (offline, no HTTP server); each strategy then replays trials from
that grid, so every strategy sees exactly the same landscape:

- a trial costs START_S of GPU time to start the server (a real vLLM 8B start-up is about a minute)
  plus the simulated replay time, less when it is stopped early; a server that fails to start costs
  START_S (vLLM fails at KV-cache allocation, the end of start-up);
- the objective is goodput (requests/s meeting every SLO target), the SLO the constraint; the target
  is 95% of the best goodput of the grid among configurations that meet the SLO, found by a trial
  that ran the whole trace;
- a configuration proposed again is not launched again (for every strategy): it gets its result back.

Ours = TPE + the feasibility model (`tuner.study.feasibility`) + early stopping (`tuner.study.pruning`:
SLO certainly lost, or dominated) + successive halving over trace length (`tuner.study.fidelity`, rungs
1/4, 1/2, all, eta 2), driven through the same `ProgressSnapshot`s a real replay sends; then its
three best configurations are measured again 3x with re-timed arrivals (95% CI) and their capacity
found by bisection (`tuner.study.capacity`).

    python experiments/benchmarks/search_strategies.py [--seeds 5] [--regrid]

Writes search_strategies.txt (all output), search_strategies.md (the tables), search_strategies.png,
and caches the grid in search_strategies_grid.json (delete it, or --regrid, to measure again).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import optuna
from optuna.trial import TrialState

from tuner.loadgen.metrics import RequestResult, summarize, tpot_s, wall_duration_s
from tuner.loadgen.replay import ProgressSnapshot, chain
from tuner.loadgen.slo import parse_slo
from tuner.outcome import Outcome
from tuner.simulator.config import EngineStartupError, SimConfig
from tuner.simulator.engine import SimArrival, simulate
from tuner.study.capacity import find_capacity, good_fraction, poisson_at_rate
from tuner.study.feasibility import PREDICTED_INFEASIBLE, FeasibilityModel, observations_from_study, tell_infeasible
from tuner.study.fidelity import RungWatch, SuccessiveHalving, finalists, remeasure, stopped_constraints
from tuner.study.pruning import SLO_LOST, SloPruner
from tuner.workload.prompts import token_ids_for
from tuner.workload.request import TraceRequest
from tuner.workload.transform import load_workload

HERE = Path(__file__).resolve().parent
TRACE = HERE.parents[1] / "workloads" / "mooncake_conversation_head300.jsonl"
CACHE = HERE / "search_strategies_grid.json"
TIME_SCALE = 0.4
MODEL, GPU, VOCAB = "llama-3.1-8b", "h100", 128256
MAX_MODEL_LEN = 121856
SLO = parse_slo("ttft_p90=10s,tpot_p90=60ms")
START_S = 60.0
TARGET = 0.95
BUDGET_FRACTION = 0.5  # each run may spend this share of the grid's GPU-seconds
GRID: dict[str, list[Any]] = {
    "max_num_seqs": [8, 16, 32, 64, 128, 256, 512],
    "max_num_batched_tokens": [1024, 2048, 4096, 8192, 16384],
    "kv_cache_dtype": ["auto", "fp8"],
    "quantization": ["none", "fp8"],
    "gpu_memory_utilization": [0.3, 0.9],  # 0.3: a GPU shared with another service
}
FINALIST_METRICS = ("goodput", "output_throughput", "p90_ttft_ms", "p90_tpot_ms")


def key_of(config: dict[str, Any]) -> str:
    return ",".join(f"{name}={config[name]}" for name in GRID)


def grid_configs() -> list[dict[str, Any]]:
    return [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]


def load_requests() -> list[TraceRequest]:
    return load_workload(TRACE, time_scale=TIME_SCALE)


def sim_config(config: dict[str, Any]) -> SimConfig:
    return SimConfig(model_shape=MODEL, gpu=GPU, max_model_len=MAX_MODEL_LEN, **config)


def arrivals_for(requests: list[TraceRequest]) -> list[SimArrival]:
    return [SimArrival(r.arrival_s, np.asarray(token_ids_for(r, i, VOCAB)), max(1, r.output_tokens))
            for i, r in enumerate(requests)]


# ---- measuring (simulate -> per-request rows, as the load generator would record them) ---------

def simulate_rows(config: dict[str, Any], requests: list[TraceRequest],
                  arrivals: list[SimArrival] | None = None) -> list[RequestResult] | str:
    """Per-request rows of one simulated replay, or the start-up error message."""
    arrivals = arrivals or arrivals_for(requests)
    try:
        report = simulate(sim_config(config), arrivals)
    except EngineStartupError as exc:
        return str(exc)
    by_identity: dict[tuple, list[int]] = {}
    for index, arrival in enumerate(arrivals):
        by_identity.setdefault((arrival.arrival_s, len(arrival.prompt), arrival.output_tokens), []).append(index)
    rows = []
    for result in report.results:
        index = by_identity[(result.arrival_s, result.prompt_tokens, result.output_tokens)].pop(0)
        e2e, ttft = result.finish_s - result.start_s, result.first_token_s - result.start_s
        rows.append(RequestResult(index=index, scheduled_s=result.arrival_s, sent_s=result.start_s, send_lag_s=0.0,
                                  finished_s=result.finish_s, ttft_s=ttft, e2e_s=e2e,
                                  tpot_s=tpot_s(e2e, ttft, result.output_tokens), prompt_tokens=result.prompt_tokens,
                                  output_tokens=result.output_tokens,
                                  requested_output_tokens=arrivals[index].output_tokens))
    return rows


def summary_of(rows: list[RequestResult]) -> dict[str, Any]:
    return summarize(rows, wall_duration_s(rows), SLO).to_dict()


_WORKER: dict[str, Any] = {}


def _init_worker() -> None:
    _WORKER["requests"] = load_requests()
    _WORKER["arrivals"] = arrivals_for(_WORKER["requests"])


def _measure_grid_point(config: dict[str, Any]) -> tuple[str, Any]:
    rows = simulate_rows(config, _WORKER["requests"], _WORKER["arrivals"])
    if isinstance(rows, str):
        return key_of(config), {"failed": rows}
    requests = _WORKER["requests"]
    ordered = sorted(rows, key=lambda r: r.index)  # one row per request, in trace order
    return key_of(config), {"lag_ttft_e2e_ms": [[round(1000 * (r.sent_s - requests[r.index].arrival_s)),
                                                 round(1000 * r.ttft_s), round(1000 * r.e2e_s)] for r in ordered]}


def cache_signature() -> str:
    text = json.dumps([hashlib.sha256(TRACE.read_bytes()).hexdigest(), TIME_SCALE, MODEL, GPU, MAX_MODEL_LEN,
                       GRID, (HERE.parents[1] / "tuner" / "simulator" / "perf_model.py").stat().st_size])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measure_grid(regrid: bool) -> dict[str, Any]:
    if CACHE.exists() and not regrid:
        cached = json.loads(CACHE.read_text())
        if cached.get("signature") == cache_signature():
            print(f"grid: read {len(cached['points'])} points from {CACHE.name}")
            return cached["points"]
    configs = grid_configs()
    started = time.perf_counter()
    points: dict[str, Any] = {}
    with Pool(min(2, os.cpu_count() or 1), initializer=_init_worker) as pool:
        for n, (key, value) in enumerate(pool.imap_unordered(_measure_grid_point, configs, chunksize=4), 1):
            points[key] = value
            if n % 40 == 0 or n == len(configs):
                print(f"grid: {n}/{len(configs)} measured ({time.perf_counter() - started:.0f} s)", flush=True)
    CACHE.write_text(json.dumps({"signature": cache_signature(), "points": points}, separators=(",", ":")))
    return points


@dataclass
class Tape:
    """One grid point's replay, to be played back to watchers as a replay would."""

    failed: str | None
    rows: list[RequestResult] = field(default_factory=list)  # in finishing order
    summary: dict[str, Any] | None = None

    @property
    def duration_s(self) -> float:
        return wall_duration_s(self.rows)

    @property
    def meets_slo(self) -> bool:
        return bool(self.summary) and all(self.summary["slo_met"].values())

    @property
    def goodput(self) -> float:
        return self.summary["goodput"] if self.summary else 0.0


def tapes_from(points: dict[str, Any], requests: list[TraceRequest]) -> dict[str, Tape]:
    tapes = {}
    for key, point in points.items():
        if "failed" in point:
            tapes[key] = Tape(point["failed"])
            continue
        rows = []
        for index, (lag_ms, ttft_ms, e2e_ms) in enumerate(point["lag_ttft_e2e_ms"]):
            request = requests[index]
            out = max(1, request.output_tokens)
            sent, ttft, e2e = request.arrival_s + lag_ms / 1000, ttft_ms / 1000, e2e_ms / 1000
            finish = sent + e2e
            rows.append(RequestResult(index=index, scheduled_s=request.arrival_s, sent_s=sent, send_lag_s=0.0,
                                      finished_s=finish, ttft_s=ttft, tpot_s=tpot_s(e2e, ttft, out), e2e_s=e2e,
                                      prompt_tokens=request.input_tokens, output_tokens=out,
                                      requested_output_tokens=out))
        rows.sort(key=lambda r: r.finished_s)
        tapes[key] = Tape(None, rows, summary_of(rows))
    return tapes


def play(tape: Tape, watcher) -> tuple[float, bool]:
    """Feed the replay's snapshots once a (simulated) second to `watcher`; (replay seconds, stopped)."""
    rows = tape.rows
    total = len(rows)
    position, tick = 0, 1.0
    while position < total:
        while position < total and rows[position].finished_s <= tick:
            position += 1
        done = tuple(rows[:position])
        snapshot = ProgressSnapshot(elapsed_s=tick, total=total, sent=total, completed=position, failed=0,
                                    in_flight=0, p50_ttft_ms=None, p99_ttft_ms=None, p50_tpot_ms=None,
                                    p99_tpot_ms=None, p99_e2e_ms=None, rows=done)
        if position < total and watcher(snapshot):
            return tick, True
        tick = max(tick + 1.0, math.floor(rows[position].finished_s) + 1.0) if position < total else tick
    return tape.duration_s, False


# ---- strategies -----------------------------------------------------------------------------

STRATEGIES = ("random", "nsga2", "tpe", "ours")
ABLATIONS = ("ours: skips told FAIL", "TPE + feasibility", "TPE + pruning", "TPE + halving")
MAX_ASKS = 700  # proposals per run, launched or not


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """The grid's knobs; the two batch limits as powers of two so the samplers see their order."""
    return {"max_num_seqs": 2 ** trial.suggest_int("log2_max_num_seqs", 3, 9),
            "max_num_batched_tokens": 2 ** trial.suggest_int("log2_max_num_batched_tokens", 10, 14),
            "kv_cache_dtype": trial.suggest_categorical("kv_cache_dtype", GRID["kv_cache_dtype"]),
            "quantization": trial.suggest_categorical("quantization", GRID["quantization"]),
            "gpu_memory_utilization": trial.suggest_categorical("gpu_memory_utilization",
                                                                GRID["gpu_memory_utilization"])}


@dataclass
class Features:
    feasibility: bool = False
    pruning: bool = False
    halving: bool = False
    skips_learnt: bool = True  # skipped and failed configurations told PRUNED + constraint, not FAIL


FEATURES = {"ours": Features(True, True, True), "ours: skips told FAIL": Features(True, True, True, False),
            "TPE + feasibility": Features(feasibility=True), "TPE + pruning": Features(pruning=True),
            "TPE + halving": Features(halving=True)}


@dataclass
class Run:
    strategy: str
    seed: int
    launches: int = 0
    spent_s: float = 0.0
    waste: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("failed start", SLO_LOST, "dominated", "screened_out", "missed SLO"), 0.0))
    waste_at_target: float | None = None  # wasted GPU-s when the target was reached
    after_lost: float = 0.0  # failed starts + replay time after a trial was certainly lost
    after_lost_at_target: float | None = None
    avoided: int = 0  # proposals predicted infeasible and not launched (distinct configurations)
    avoided_would_fail: int = 0
    curve: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0)])  # (spent, best goodput)
    reached: tuple[int, float] | None = None  # (launches, GPU-s) when 95% of the best was found
    best: float = 0.0
    full_runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> summary of complete trials


def make_sampler_for(strategy: str, seed: int) -> optuna.samplers.BaseSampler:
    from tuner.study.tune import make_sampler  # the tuner's own settings for each sampler

    return make_sampler("tpe" if strategy not in ("random", "nsga2") else strategy, False, seed)


def run_strategy(strategy: str, seed: int, tapes: dict[str, Tape], requests: list[TraceRequest],
                 grid_best: float, budget_s: float) -> Run:
    from tuner.records.objectives import slo_constraints

    features = FEATURES.get(strategy, Features())
    study = optuna.create_study(direction="maximize", sampler=make_sampler_for(strategy, seed))
    run = Run(strategy, seed)
    halving = SuccessiveHalving(eta=2.0)
    span_s = requests[-1].arrival_s - requests[0].arrival_s
    memo: dict[str, tuple[str, Any]] = {}  # measured configurations: what to tell again
    avoided: set[str] = set()
    for _ in range(MAX_ASKS):
        if run.spent_s >= budget_s:
            break
        trial = study.ask()
        config = suggest(trial)
        key = key_of(config)
        trial.set_user_attr("config", config)
        if key in memo:
            kind, payload = memo[key]
            _tell_again(study, trial, kind, payload)
            continue
        if features.feasibility:
            model = FeasibilityModel().fit(observations_from_study(study))
            verdict = model.verdict(config)
            if not verdict.launch:
                if key not in avoided:
                    avoided.add(key)
                    run.avoided += 1
                    run.avoided_would_fail += tapes[key].failed is not None
                if features.skips_learnt:
                    tell_infeasible(study, trial, PREDICTED_INFEASIBLE, verdict.reason, verdict.p_fail)
                else:
                    trial.set_user_attr("failure", PREDICTED_INFEASIBLE)
                    study.tell(trial, state=TrialState.FAIL)
                continue
        tape = tapes[key]
        run.launches += 1
        best_at_launch = run.best
        if tape.failed:
            cost, wasted = START_S, "failed start"
            if features.skips_learnt and features.feasibility:
                tell_infeasible(study, trial, Outcome.OOM_STARTUP, tape.failed)
                memo[key] = ("infeasible", tape.failed)
            else:
                trial.set_user_attr("failure", Outcome.OOM_STARTUP)
                study.tell(trial, state=TrialState.FAIL)
                memo[key] = ("fail", None)
        else:
            watchers = []
            pruner = SloPruner(SLO, len(requests), best_goodput=run.best or None, span_s=span_s)
            rungs = RungWatch(halving, requests, SLO)
            if features.pruning:
                watchers.append(pruner)
            if features.halving:
                watchers.append(rungs)
            replay_s, stopped = play(tape, chain(*watchers)) if watchers else (tape.duration_s, False)
            cost = START_S + replay_s
            if stopped:
                decision = pruner.decision or rungs.decision
                wasted = decision.kind
                trial.set_user_attr("pruned", decision.as_attrs())
                constraints = stopped_constraints(SLO, pruner if features.pruning else None, rungs)
                for name, c in constraints.items():
                    trial.set_constraint(name, c)
                study.tell(trial, state=TrialState.PRUNED)
                memo[key] = ("pruned", constraints)
            else:
                if features.halving:
                    rungs.finish(tape.rows, tape.summary)
                constraints = dict(zip((t.name for t in SLO.targets), slo_constraints(SLO, tape.summary)))
                for name, value in constraints.items():
                    trial.set_constraint(name, value)
                study.tell(trial, tape.goodput)
                memo[key] = ("complete", (tape.goodput, constraints))
                run.full_runs[key] = tape.summary
                wasted = None if tape.meets_slo else "missed SLO"
                if tape.meets_slo:
                    run.best = max(run.best, tape.goodput)
            # GPU time spent after the trial was certainly lost (SLO, or beaten by the best known at launch)
            lost_s, lost = play(tape, SloPruner(SLO, len(requests), best_goodput=best_at_launch or None,
                                                span_s=span_s))
            run.after_lost += max(0.0, replay_s - lost_s) if lost else 0.0
        run.spent_s += cost
        if wasted:
            run.waste[wasted] += cost
        if wasted == "failed start":
            run.after_lost += cost
        run.curve.append((run.spent_s, run.best))
        if run.reached is None and run.best >= TARGET * grid_best:
            run.reached = (run.launches, run.spent_s)
            run.waste_at_target = sum(run.waste.values())
            run.after_lost_at_target = run.after_lost
    return run


def _tell_again(study: optuna.Study, trial: optuna.Trial, kind: str, payload: Any) -> None:
    if kind == "fail":
        trial.set_user_attr("failure", Outcome.OOM_STARTUP)
        study.tell(trial, state=TrialState.FAIL)
    elif kind == "infeasible":
        tell_infeasible(study, trial, Outcome.OOM_STARTUP, payload)
    elif kind == "pruned":
        for name, value in payload.items():
            trial.set_constraint(name, value)
        study.tell(trial, state=TrialState.PRUNED)
    else:
        value, constraints = payload
        for name, c in constraints.items():
            trial.set_constraint(name, c)
        study.tell(trial, value)


# ---- finalists and capacity -------------------------------------------------------------------

@dataclass
class Candidate:
    config: dict[str, Any]
    summary: dict[str, Any]


def config_of(key: str) -> dict[str, Any]:
    return next(c for c in grid_configs() if key_of(c) == key)


def measure_finalists(run: Run, requests: list[TraceRequest], repeats: int = 3):
    # configurations that measured exactly alike (e.g. max_num_seqs above what the token budget admits)
    # count once, so the finalists differ
    distinct = {(s["goodput"], s["output_throughput"]): Candidate(config_of(k), s) for k, s in run.full_runs.items()}
    chosen = finalists(list(distinct.values()), count=3)
    results, gpu_s = [], 0.0
    for candidate in chosen:
        def measure(retimed_requests: list[TraceRequest], config=candidate.config) -> dict[str, Any]:
            rows = simulate_rows(config, retimed_requests)
            return summary_of(rows)
        remeasured = remeasure(candidate.config, measure, requests, repeats=repeats, seed=1000,
                               metrics=FINALIST_METRICS)
        gpu_s += sum(START_S + s["duration_s"] for s in remeasured.summaries)
        results.append((candidate, remeasured))
    return results, gpu_s


def capacity_of(config: dict[str, Any], requests: list[TraceRequest]) -> tuple[Any, float, float]:
    """Bisection on the Poisson rate (>= 90% of requests good, the p90 SLO per request); GPU-s of the
    search with and without stopping a probe once its SLO is lost."""
    costs = {"full": 0.0, "pruned": 0.0}

    def measure(rate: float) -> float:
        at_rate = poisson_at_rate(requests, rate, seed=0)
        rows = simulate_rows(config, at_rate)
        summary = summary_of(rows)
        tape = Tape(None, sorted(rows, key=lambda r: r.finished_s), summary)
        replay_s, stopped = play(tape, SloPruner(SLO, len(at_rate)))
        fraction = good_fraction(summary, len(at_rate))
        assert not (stopped and fraction >= 0.9), "a pruned probe must be one that fails"
        costs["full"] += tape.duration_s
        costs["pruned"] += replay_s
        return fraction

    result = find_capacity(measure, low=0.25, high=4.0, tolerance=0.05, attainment=0.90)
    return result, START_S + costs["full"], START_S + costs["pruned"]  # one server start, probes in a row


# ---- report -----------------------------------------------------------------------------------

def _median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def strategy_table(runs: dict[str, list[Run]], grid_gpu_s: float, names: tuple[str, ...]) -> str:
    lines = ["| strategy | runs reaching 95% | launches to 95% | GPU-s to 95%, % of grid | wasted until then: "
             "failed starts + time after certainly lost | all time on failed, stopped or SLO-missing trials "
             "until then | launches avoided (would fail) |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        group = runs[name]
        reached = [r for r in group if r.reached]
        launches = [float(r.reached[0]) for r in reached]
        share = [100 * r.reached[1] / grid_gpu_s for r in reached]
        after_lost = [100 * r.after_lost_at_target / r.reached[1] for r in reached]
        strict = [100 * r.waste_at_target / r.reached[1] for r in reached]
        avoided = (f"{statistics.median([r.avoided for r in group]):.0f} "
                   f"({statistics.median([r.avoided_would_fail for r in group]):.0f})"
                   if any(r.avoided for r in group) else "—")
        lines.append(f"| {name} | {len(reached)}/{len(group)} | {_median_range(launches, '.0f')} | "
                     f"{_median_range(share, '.1f')} | {_median_range(after_lost, '.1f')}% | "
                     f"{_median_range(strict, '.0f')}% | {avoided} |")
    return "\n".join(lines)


def waste_table(runs: dict[str, list[Run]], names: tuple[str, ...]) -> str:
    kinds = ("failed start", SLO_LOST, "dominated", "screened_out", "missed SLO")
    lines = ["| strategy | launches | GPU-s spent | failed starts + after certainly lost | "
             + " | ".join(kinds) + " |", "|---|---|---|---|" + "---|" * len(kinds)]
    for name in names:
        group = runs[name]
        spent = statistics.mean(r.spent_s for r in group)
        cells = [f"{statistics.mean(100 * r.waste[k] / r.spent_s for r in group):.1f}%" for k in kinds]
        lines.append(f"| {name} | {statistics.mean(r.launches for r in group):.0f} | {spent:,.0f} | "
                     f"{statistics.mean(100 * r.after_lost / r.spent_s for r in group):.1f}% | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[Run]], grid_gpu_s: float, grid_best: float, path: Path,
         names: tuple[str, ...] = STRATEGIES, ylabel: str = "best goodput within the SLO found / grid's best",
         title: str = "") -> None:
    """Median over seeds of each run's `curve` (GPU-s spent, goodput) against the share of the grid's GPU time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = np.geomspace(0.5, 100 * BUDGET_FRACTION, 400)
    for name in names:
        curves = []
        for run in runs[name]:
            spent = np.array([100 * s / grid_gpu_s for s, _ in run.curve])
            best = np.array([b / grid_best for _, b in run.curve])
            curves.append(best[np.searchsorted(spent, xs, side="right") - 1])
        ax.step(xs, np.median(curves, axis=0), where="post", label=f"{name} (median of {len(curves)} seeds)")
    ax.axhline(TARGET, color="gray", linestyle="--", linewidth=1, label="95% of the grid's best")
    ax.axvline(25, color="gray", linestyle=":", linewidth=1, label="25% of the grid's GPU time")
    ax.set_xscale("log")
    ticks = [0.5, 1, 2, 5, 10, 25, 50]
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.set_xlabel("simulated GPU time spent, share of measuring the whole grid (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"Search strategies, SIMULATED {MODEL} on {GPU}, {SLO}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--regrid", action="store_true", help="measure the grid again")
    parser.add_argument("--no-ablations", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    print(f"SIMULATED: {MODEL} on one {GPU}, {TRACE.name} (300 requests) at time scale {TIME_SCALE}, "
          f"SLO {SLO}; start-up {START_S:.0f} s per launch; python {platform.python_version()}, "
          f"optuna {optuna.__version__}, {os.cpu_count()} cores")
    requests = load_requests()
    tapes = tapes_from(measure_grid(args.regrid), requests)
    grid_gpu_s = sum(START_S + (0.0 if t.failed else t.duration_s) for t in tapes.values())
    feasible = {k: t for k, t in tapes.items() if not t.failed and t.meets_slo}
    grid_best = max(t.goodput for t in feasible.values())
    near = sum(t.goodput >= TARGET * grid_best for t in feasible.values())
    failed = sum(1 for t in tapes.values() if t.failed)
    print(f"grid: {len(tapes)} configurations ({' x '.join(str(len(v)) for v in GRID.values())}); "
          f"{failed} fail at start-up, {len(feasible)} meet the SLO, {near} within 95% of the best goodput "
          f"{grid_best:.3f} req/s; measuring it all costs {grid_gpu_s:,.0f} simulated GPU-s "
          f"({grid_gpu_s / 3600:.1f} h)")
    budget_s = BUDGET_FRACTION * grid_gpu_s
    names = STRATEGIES + (() if args.no_ablations else ABLATIONS)
    runs: dict[str, list[Run]] = {}
    for name in names:
        t0 = time.perf_counter()
        runs[name] = [run_strategy(name, seed, tapes, requests, grid_best, budget_s) for seed in range(args.seeds)]
        print(f"{name}: {args.seeds} runs in {time.perf_counter() - t0:.0f} s", flush=True)

    table = strategy_table(runs, grid_gpu_s, STRATEGIES)
    ablation = strategy_table(runs, grid_gpu_s, ABLATIONS) if not args.no_ablations else ""
    waste = waste_table(runs, names)

    ours0 = runs["ours"][0]
    remeasured, finalist_gpu_s = measure_finalists(ours0, requests)
    fin = ["| configuration | goodput in the search | goodput, 3 re-timed runs (95% CI) | "
           "output tok/s (95% CI) | TTFT p90 ms | TPOT p90 ms | capacity (>= 90% good) | "
           "capacity search GPU-s, with / without early stop |", "|---|---|---|---|---|---|---|---|"]
    capacity_saving = []
    for candidate, result in remeasured:
        capacity, full_s, pruned_s = capacity_of(candidate.config, requests)
        capacity_saving.append(1 - pruned_s / full_s)
        e = result.estimates
        fin.append(f"| {key_of(candidate.config)} | {candidate.summary['goodput']:.3f} | {e['goodput']} | "
                   f"{e['output_throughput']} | {e['p90_ttft_ms']} | {e['p90_tpot_ms']} | {capacity} | "
                   f"{pruned_s:,.0f} / {full_s:,.0f} |")
    finalists_text = "\n".join(fin)

    ours = runs["ours"]
    ours_share = [100 * r.reached[1] / grid_gpu_s for r in ours if r.reached]
    ours_waste = [100 * r.after_lost_at_target / r.reached[1] for r in ours if r.reached]
    ours_strict = [100 * r.waste_at_target / r.reached[1] for r in ours if r.reached]
    median = lambda values: statistics.median(values) if values else float("nan")  # noqa: E731
    verdict = (f"ours reached 95% of the grid's best in {len(ours_share)}/{len(ours)} runs, median "
               f"{median(ours_share):.1f}% of the grid's GPU-seconds (target <= 25%); until then, failed starts and "
               f"time after a trial was certainly lost took a median {median(ours_waste):.1f}% of the GPU time "
               f"(target < 15%), while all the time on failed, stopped or SLO-missing trials, the exploration "
               f"included, was {median(ours_strict):.0f}% (plain TPE: "
               f"{median([100 * r.waste_at_target / r.reached[1] for r in runs['tpe'] if r.reached]):.0f}%); finalists "
               f"re-measured 3x: {100 * finalist_gpu_s / grid_gpu_s:.1f}% of the grid's GPU-seconds more; early "
               f"stopping cut the capacity searches' GPU time by {100 * statistics.mean(capacity_saving):.0f}%")
    document = "\n\n".join([
        f"## Search strategies (SIMULATED: {MODEL} on one {GPU})",
        f"Trace {TRACE.name}, 300 requests at time scale {TIME_SCALE}; SLO `{SLO}`; objective goodput; "
        f"{len(tapes)}-point grid: {failed} fail at start-up, {len(feasible)} meet the SLO, {near} within 95% "
        f"of the best ({grid_best:.3f} req/s). The whole grid costs {grid_gpu_s:,.0f} simulated GPU-s; each run "
        f"may spend {100 * BUDGET_FRACTION:.0f}% of it; {args.seeds} seeds per strategy; median [min–max].",
        table, "Ablations (each piece of ours alone on TPE, and ours with skipped and failed "
               "configurations told to Optuna as FAIL instead of PRUNED + constraint):", ablation,
        "Where the GPU time went over the whole budget (mean share of each run's GPU-s; the first column is "
        "failed starts plus replay time after a trial's SLO was certainly lost or it could no longer beat the "
        "best known when it started; the others are all the time of trials that ended that way):", waste,
        "Ours, seed 0: its three best configurations re-measured 3x with re-timed arrivals (jitter seeds "
        "1000-1002), and their capacity by bisection on a Poisson rate:", finalists_text,
        f"**Result:** {verdict}."])
    print("\n" + document)
    (HERE / "search_strategies.md").write_text(document + "\n")
    plot(runs, grid_gpu_s, grid_best, HERE / "search_strategies.png")
    print(f"\nwrote search_strategies.md, search_strategies.png; total {time.perf_counter() - started:.0f} s")


def run_teed(main_function, path: Path) -> None:
    """Run `main_function`, its output both on the console and in `path`."""
    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            sys.__stdout__.write(text)
            buffer.write(text)
            return len(text)

        def flush(self) -> None:
            sys.__stdout__.flush()

    with redirect_stdout(Tee()):
        main_function()
    path.write_text(buffer.getvalue())


if __name__ == "__main__":
    run_teed(main, HERE / "search_strategies.txt")
