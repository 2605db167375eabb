"""Goodput-first search when no configuration meets the SLO: plain TPE, the round-1 rules, the new rules.

The same SIMULATED landscape as `search_strategies.py` (its cached 280-point grid: Llama-3.1-8B on one
H100, the Mooncake conversation slice at time scale 0.4; each grid point stores every request's TTFT
and end-to-end latency, so goodput under another SLO is recomputed from the rows, nothing re-measured),
judged against an SLO that no grid point meets: TTFT p90 <= 5 s and TPOT p90 <= 20 ms, both tighter
than every grid point's (best: 8.4 s and 20.7 ms). The defaults (the grid point nearest vLLM's H100
defaults: max_num_seqs 512, max_num_batched_tokens 8192, no quantization, gpu_memory_utilization 0.9)
miss it by far. Goodput (requests/s whose own TTFT and TPOT meet the limits) still differs across
configurations.

Every strategy measures the defaults first, in full (as `tune` does, trial 0), then asks TPE (the
tuner's settings) on goodput; costs as in `search_strategies.py` (START_S per launch plus the replayed
time; a configuration proposed again gets its result back):

- tpe: every trial runs the whole trace; the SLO constraints go to the sampler (plain Optuna usage);
- old ours: the round-1 rules: feasibility model, "SLO certainly lost" stops a trial whatever the
  others did, the dominance bound only against SLO-meeting trials, successive halving; the
  recommendation only among SLO-meeting trials (round-1 `pick`), so none here;
- new ours: `tune --slo` as it is now: `SloPruner(stop_on_slo_lost=<some completed trial meets the
  SLO>)`, the dominance bound against the best final goodput per GPU of the completed (reliable)
  trials, the feasibility model, and the SLO constraints kept from the sampler (goodput already
  counts the SLO per request; with constraints, TPE ranks trials that all miss the SLO by violation
  alone); the recommendation is `tuner.records.pareto.pick` over the completed trials.

Measured: GPU time until the strategy's recommendation (plain TPE: `pick` over its completed trials)
is within 95% of the grid's best goodput, each run may spend 50% of the grid's GPU time. Ablations, to
see where the GPU time goes: new ours with --halving (rungs 1/4, 1/2, all, eta 2), new ours with the
SLO constraints told to the sampler (the first version of this round), plain TPE without them; and
what the sampler was told about the trials stopped early. The runs go to 2 processes.

    python experiments/benchmarks/goodput_first.py [--seeds 5] [--no-ablations]

Writes goodput_first.txt (all output), goodput_first.md (the tables) and goodput_first.png.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
import search_strategies as ss
from optuna.trial import TrialState

from tuner.loadgen.replay import chain
from tuner.loadgen.slo import parse_slo
from tuner.outcome import Outcome
from tuner.records.objectives import Objectives, slo_constraints
from tuner.records.pareto import Point, pick
from tuner.records.reliability import unreliable_reasons
from tuner.study.feasibility import PREDICTED_INFEASIBLE, FeasibilityModel, observations_from_study, tell_infeasible
from tuner.study.fidelity import RungWatch, SuccessiveHalving, stopped_constraints
from tuner.study.pruning import SloPruner
from tuner.workload.request import TraceRequest

SLO = parse_slo("ttft_p90=5s,tpot_p90=20ms")
DEFAULTS = {"max_num_seqs": 512, "max_num_batched_tokens": 8192, "kv_cache_dtype": "auto", "quantization": "none",
            "gpu_memory_utilization": 0.9}
STRATEGIES = ("tpe", "old ours", "new ours")
ABLATIONS = ("new ours with --halving", "new ours, SLO constraints told", "tpe, no SLO constraints told")


@dataclass(frozen=True)
class Setup:
    rules: str | None  # "old", "new", or None: every trial runs the whole trace
    halving: bool = True
    constraints: bool = True  # the SLO constraint values go to the sampler (Trial.set_constraint); with a
    # goodput objective `tune` keeps them from the sampler (they only decide the recommendation)


SETUPS = {"tpe": Setup(None), "old ours": Setup("old"),
          "new ours": Setup("new", halving=False, constraints=False),  # what `tune --slo` does by default
          "new ours with --halving": Setup("new", halving=True, constraints=False),
          "new ours, SLO constraints told": Setup("new", halving=False, constraints=True),
          "tpe, no SLO constraints told": Setup(None, constraints=False)}
OBJECTIVES = Objectives(("goodput",))


@dataclass
class Run(ss.Run):
    """`curve` and `best` follow the recommendation's goodput (0 while there is none)."""

    answer: str | None = None  # the final recommendation's configuration
    best_completed: float = 0.0  # best goodput among the trials that ran the whole trace
    completed: int = 0
    stops: Counter = field(default_factory=Counter)  # stopped trials by decision kind
    thrown_away: float = 0.0  # best full-trace goodput among the configurations it stopped early
    near_best_stopped: int = 0  # stopped trials whose full-trace goodput is within 95% of the grid's best
    log: list[str] = field(default_factory=list)  # one line per launch
    understated: int = 0  # stopped trials told a smaller SLO violation than their whole trace has
    looked_best: int = 0  # ... smaller than every completed trial's: the sampler's best so far
    least_violation: float = math.inf  # among completed trials, as told


def point_of(number: int, config: dict[str, Any], tape: ss.Tape, baseline: bool) -> Point:
    """As `completed_points` reads a completed trial of `tune` (one GPU, sim engine)."""
    return Point(number=number, engine="sim", config=config, summary=tape.summary, command=[],
                 feasible=tape.meets_slo, baseline=baseline, gpus=1,
                 unreliable=tuple(unreliable_reasons(tape.summary, {})))


def watchers_for(rules: str, points: list[Point], halving: SuccessiveHalving | None, requests: list[TraceRequest],
                 span_s: float) -> tuple[SloPruner, RungWatch | None]:
    if rules == "new":  # Tuner._watchers, line for line (one GPU per trial here)
        points = [p for p in points if not p.unreliable] or points
        feasible = [p for p in points if p.feasible]
        best = max(((p.summary.get("goodput") or 0.0) / max(1, p.gpus) for p in feasible or points), default=0.0)
        pruner = SloPruner(SLO, len(requests), best_goodput=best or None, span_s=span_s,
                           stop_on_slo_lost=bool(feasible))
    else:  # round 1: the best among SLO-meeting trials only; a lost SLO always stops
        best = max((p.summary["goodput"] for p in points if p.feasible), default=0.0)
        pruner = SloPruner(SLO, len(requests), best_goodput=best or None, span_s=span_s)
    return pruner, RungWatch(halving, requests, SLO) if halving else None


def recommend(rules: str | None, points: list[Point], offered_rate: float) -> Point | None:
    if rules == "old":  # round-1 pick: the SLO-meeting trials or nothing
        points = [p for p in points if p.feasible]
    return pick(points, OBJECTIVES, offered_rate=offered_rate)


def run_search(strategy: str, seed: int, tapes: dict[str, ss.Tape], requests: list[TraceRequest],
               grid_best: float, budget_s: float, offered_rate: float) -> Run:
    setup = SETUPS[strategy]
    rules = setup.rules
    study = optuna.create_study(direction="maximize", sampler=ss.make_sampler_for("tpe", seed))
    study.enqueue_trial({"log2_max_num_seqs": int(math.log2(DEFAULTS["max_num_seqs"])),
                         "log2_max_num_batched_tokens": int(math.log2(DEFAULTS["max_num_batched_tokens"])),
                         **{k: DEFAULTS[k] for k in ("kv_cache_dtype", "quantization", "gpu_memory_utilization")}},
                        user_attrs={"baseline": True})
    run = Run(strategy, seed)
    halving = SuccessiveHalving(eta=2.0) if setup.halving else None
    span_s = requests[-1].arrival_s - requests[0].arrival_s
    memo: dict[str, tuple[str, Any]] = {}
    points: list[Point] = []
    for _ in range(ss.MAX_ASKS):
        if run.spent_s >= budget_s:
            break
        trial = study.ask()
        config = ss.suggest(trial)
        key = ss.key_of(config)
        baseline = bool(trial.user_attrs.get("baseline"))
        trial.set_user_attr("config", config)
        if key in memo:
            ss._tell_again(study, trial, *memo[key])
            continue
        if rules and not baseline:
            verdict = FeasibilityModel().fit(observations_from_study(study)).verdict(config)
            if not verdict.launch:
                tell_infeasible(study, trial, PREDICTED_INFEASIBLE, verdict.reason, verdict.p_fail)
                run.avoided += 1
                continue
        tape = tapes[key]
        run.launches += 1
        if tape.failed:  # as tune records a failed start
            cost = ss.START_S
            trial.set_user_attr("failure", Outcome.OOM_STARTUP)
            study.tell(trial, state=TrialState.FAIL)
            memo[key] = ("fail", None)
        else:
            pruner, rungs = watchers_for(rules, points, halving, requests, span_s) if rules and not baseline \
                else (None, None)
            watchers = [w for w in (pruner, rungs) if w is not None]
            replay_s, stopped = ss.play(tape, chain(*watchers)) if watchers else (tape.duration_s, False)
            cost = ss.START_S + replay_s
            if stopped:
                decision = pruner.decision or rungs.decision
                run.stops[decision.kind] += 1
                run.thrown_away = max(run.thrown_away, tape.goodput)
                run.near_best_stopped += tape.goodput >= ss.TARGET * grid_best
                constraints = stopped_constraints(SLO, pruner, rungs) if setup.constraints else {}
                if constraints:
                    told = sum(max(0.0, v) for v in constraints.values())
                    run.understated += told < sum(max(0.0, v) for v in slo_constraints(SLO, tape.summary))
                    run.looked_best += told < run.least_violation
                for name, value in constraints.items():
                    trial.set_constraint(name, value)
                study.tell(trial, state=TrialState.PRUNED)
                memo[key] = ("pruned", constraints)
            else:
                if rungs is not None:
                    rungs.finish(tape.rows, tape.summary)
                constraints = dict(zip((t.name for t in SLO.targets), slo_constraints(SLO, tape.summary))) \
                    if setup.constraints else {}
                for name, value in constraints.items():
                    trial.set_constraint(name, value)
                if constraints:
                    run.least_violation = min(run.least_violation, sum(max(0.0, v) for v in constraints.values()))
                study.tell(trial, tape.goodput)
                memo[key] = ("complete", (tape.goodput, constraints))
                points.append(point_of(trial.number, config, tape, baseline))
                run.completed += 1
                run.best_completed = max(run.best_completed, tape.goodput)
        run.spent_s += cost
        frozen = study.trials[trial.number]
        run.log.append(f"{run.launches:3d} {run.spent_s:8,.0f} GPU-s {key}: {frozen.state.name.lower()}"
                       f"{' (' + decision.kind + ')' if frozen.state == TrialState.PRUNED else ''}, full-trace "
                       f"goodput {tape.goodput:.3f}, SLO violation told "
                       f"{sum(v for v in frozen.constraints.values() if v > 0):,.0f} ms")
        chosen = recommend(rules, points, offered_rate)
        run.best = chosen.summary["goodput"] if chosen else 0.0
        run.answer = ss.key_of(chosen.config) if chosen else None
        run.curve.append((run.spent_s, run.best))
        if run.reached is None and run.best >= ss.TARGET * grid_best:
            run.reached = (run.launches, run.spent_s)
    return run


# ---- report -----------------------------------------------------------------------------------

def median_with_misses(values: list[float]) -> float:
    """Median where a run that never reached counts as infinitely slow."""
    return statistics.median(values) if values else math.inf


def strategy_table(runs: dict[str, list[Run]], grid_gpu_s: float, grid_best: float) -> str:
    lines = ["| strategy | runs answering | runs reaching 95% | launches to 95% | GPU-s to 95%, median over "
             "seeds (not reached = ∞) | GPU-s to 95%, % of grid, median [min–max] of runs reaching | final "
             "recommendation, % of best goodput | best completed trial, % of best | best configuration stopped "
             "early, its full-trace goodput, % of best | near-best trials stopped early (mean) | launches (mean) | "
             "trials completed / stopped (SLO lost, dominated, screened out), mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, group in runs.items():
        reached = [r for r in group if r.reached]
        to_target = [r.reached[1] if r.reached else math.inf for r in group]
        answered = sum(r.answer is not None for r in group)
        mean = lambda f: statistics.mean(f(r) for r in group)  # noqa: E731,B023 (used in this iteration only)
        lines.append(
            f"| {name} | {answered}/{len(group)} | {len(reached)}/{len(group)} | "
            f"{ss._median_range([float(r.reached[0]) for r in reached], '.0f')} | "
            f"{median_with_misses(to_target):,.0f} | "
            f"{ss._median_range([100 * r.reached[1] / grid_gpu_s for r in reached], '.1f')} | "
            f"{ss._median_range([100 * r.best / grid_best for r in group], '.0f')} | "
            f"{ss._median_range([100 * r.best_completed / grid_best for r in group], '.0f')} | "
            f"{ss._median_range([100 * r.thrown_away / grid_best for r in group], '.0f')} | "
            f"{mean(lambda r: r.near_best_stopped):.1f} | "
            f"{mean(lambda r: r.launches):.0f} | {mean(lambda r: r.completed):.0f} / "
            f"{mean(lambda r: r.stops['slo_lost']):.0f}, {mean(lambda r: r.stops['dominated']):.0f}, "
            f"{mean(lambda r: r.stops['screened_out']):.0f} |")
    return "\n".join(lines)


def per_seed_table(runs: dict[str, list[Run]]) -> str:
    names = list(runs)
    lines = ["| seed | " + " | ".join(f"{n}: GPU-s to 95% (launches)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for seed in range(len(runs[names[0]])):
        cells = []
        for name in names:
            r = runs[name][seed]
            cells.append(f"{r.reached[1]:,.0f} ({r.reached[0]})" if r.reached else "never")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sampler_view_table(runs: dict[str, list[Run]]) -> str:
    lines = ["| strategy | trials stopped early | told a smaller violation than their whole trace has | told a "
             "smaller violation than every completed trial's (the sampler's best so far) |", "|---|---|---|---|"]
    for name, group in runs.items():
        mean = [statistics.mean(getattr(r, f) if f != "stopped" else sum(r.stops.values()) for r in group)
                for f in ("stopped", "understated", "looked_best")]
        lines.append(f"| {name} | {mean[0]:.1f} | {mean[1]:.1f} | {mean[2]:.1f} |")
    return "\n".join(lines)


SAMPLER_NOTE = (
    "Why (read from Optuna's TPESampler, optuna 5.0): a trial with any constraint value above 0 is infeasible, "
    "and TPE ranks infeasible trials by their summed violation alone, never by their objective. With an SLO that "
    "no configuration meets every trial is infeasible, so TPE, in every strategy that tells it the SLO "
    "constraints (as `tune` does), searches for the smallest summed violation in ms (here TTFT p90 excess), not "
    "for goodput. Plain TPE gets away with it on this grid because its completed trials carry their whole-trace "
    "violation, and the least-violating configurations are near-best in goodput. A trial stopped early is told "
    "the violation of the requests it finished (`fidelity.stopped_constraints`: a rung's window, or "
    "`SloPruner.constraint_values`), which for this trace's early, lighter part is smaller than its whole-trace "
    "violation, so poor configurations stopped early can rank among the sampler's best and draw the search to "
    "them (the per-launch log of new ours' slowest run is in goodput_first.txt). A PRUNED trial also carries no "
    "intermediate value (`tune` reports none), so without constraints TPE ranks all stopped trials alike.")


_SHARED: dict[str, Any] = {}  # set before the worker processes fork


def _run_job(job: tuple[str, int]) -> Run:
    return run_search(*job, **_SHARED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-ablations", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    ss.SLO = SLO  # the shared helpers (summaries, tapes) judge against this SLO
    print(f"SIMULATED: {ss.MODEL} on one {ss.GPU}, {ss.TRACE.name} (300 requests) at time scale {ss.TIME_SCALE}, "
          f"SLO {SLO}; start-up {ss.START_S:.0f} s per launch; optuna {optuna.__version__}")
    requests = ss.load_requests()
    tapes = ss.tapes_from(ss.measure_grid(False), requests)
    ran = {k: t for k, t in tapes.items() if not t.failed}
    grid_gpu_s = sum(ss.START_S + (0.0 if t.failed else t.duration_s) for t in tapes.values())
    grid_best = max(t.goodput for t in ran.values())
    best_ttft = min(t.summary["p90_ttft_ms"] for t in ran.values())
    best_tpot = min(t.summary["p90_tpot_ms"] for t in ran.values())
    near: dict[str, list[int]] = {}  # the rest of the configuration -> its max_num_seqs values
    for key, tape in ran.items():
        if tape.goodput >= ss.TARGET * grid_best:
            seqs, rest = key.split(",", 1)
            near.setdefault(rest, []).append(int(seqs.split("=")[1]))
    near_text = "; ".join(f"{rest} with max_num_seqs {', '.join(map(str, sorted(v)))}" for rest, v in near.items())
    defaults = tapes[ss.key_of(DEFAULTS)]
    span_s = requests[-1].arrival_s - requests[0].arrival_s
    offered_rate = (len(requests) - 1) / span_s
    goodputs = sorted(t.goodput for t in ran.values())
    landscape = (
        f"{len(tapes)} configurations, {len(tapes) - len(ran)} fail at start-up, "
        f"{sum(t.meets_slo for t in ran.values())} meet the SLO (best TTFT p90 {best_ttft:,.0f} ms, best TPOT p90 "
        f"{best_tpot:.1f} ms); goodput under the SLO: best {grid_best:.3f} req/s, "
        f"median {statistics.median(goodputs):.3f}, lowest {goodputs[0]:.3f}; {sum(map(len, near.values()))} within "
        f"95% of the best ({near_text}); the defaults: goodput {defaults.goodput:.3f} req/s, "
        f"TTFT p90 {defaults.summary['p90_ttft_ms']:,.0f} ms, TPOT p90 {defaults.summary['p90_tpot_ms']:.1f} ms; "
        f"offered rate {offered_rate:.2f} req/s; measuring the whole grid "
        f"costs {grid_gpu_s:,.0f} simulated GPU-s")
    print("grid: " + landscape)
    assert not any(t.meets_slo for t in ran.values()) and not defaults.meets_slo
    budget_s = ss.BUDGET_FRACTION * grid_gpu_s
    names = STRATEGIES + (() if args.no_ablations else ABLATIONS)
    t0 = time.perf_counter()
    _SHARED.update(tapes=tapes, requests=requests, grid_best=grid_best, budget_s=budget_s, offered_rate=offered_rate)
    jobs = [(name, seed) for name in names for seed in range(args.seeds)]
    with multiprocessing.get_context("fork").Pool(2) as pool:  # the runs are independent
        done = pool.map(_run_job, jobs, chunksize=1)
    runs = {name: [r for r in done if r.strategy == name] for name in names}
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s (2 processes)", flush=True)

    def to_target(name: str) -> float:
        return median_with_misses([r.reached[1] if r.reached else math.inf for r in runs[name]])

    tpe_s, new_s = to_target("tpe"), to_target("new ours")
    old = runs["old ours"]
    verdict = (f"new ours reached 95% of the grid's best goodput in {sum(bool(r.reached) for r in runs['new ours'])}/"
               f"{args.seeds} runs, median {new_s:,.0f} GPU-s against {tpe_s:,.0f} for plain TPE: the acceptance "
               f"target (less GPU time than plain TPE) is {'MET' if new_s < tpe_s else 'NOT MET'}. The round-1 rules "
               f"answered in {sum(r.answer is not None for r in old)}/{args.seeds} runs (they recommend only "
               f"SLO-meeting configurations); their best completed trial reached a median "
               f"{statistics.median(100 * r.best_completed / grid_best for r in old):.0f}% of the best goodput, and "
               f"they stopped configurations worth up to "
               f"{statistics.median(100 * r.thrown_away / grid_best for r in old):.0f}% of it (median over seeds)")
    worst = max(runs["new ours"], key=lambda r: (r.reached is None, r.reached[1] if r.reached else 0.0))
    parts = [
        f"## Goodput-first search, an SLO nothing meets (SIMULATED: {ss.MODEL} on one {ss.GPU})",
        f"Trace {ss.TRACE.name}, 300 requests at time scale {ss.TIME_SCALE}; SLO `{SLO}`; objective goodput; the "
        f"grid of `search_strategies.py`: {landscape}. Each run measures the defaults first and may spend "
        f"{100 * ss.BUDGET_FRACTION:.0f}% of the grid's GPU time; {args.seeds} seeds per strategy; the target is a "
        f"recommendation within 95% of the grid's best goodput ({ss.TARGET * grid_best:.3f} req/s).",
        strategy_table({n: runs[n] for n in STRATEGIES}, grid_gpu_s, grid_best), "Per seed:",
        per_seed_table({n: runs[n] for n in names}), f"**Result:** {verdict}."]
    if not args.no_ablations:
        parts += ["Ablations, to see why (same seeds):",
                  strategy_table({n: runs[n] for n in ABLATIONS}, grid_gpu_s, grid_best),
                  "What the sampler was told about the trials stopped early (mean per run; a violation is the sum "
                  "over the SLO targets of percentile minus limit, in ms, as `Trial.set_constraint` receives it):",
                  sampler_view_table({n: runs[n] for n in names if SETUPS[n].rules and SETUPS[n].constraints}),
                  SAMPLER_NOTE]
    document = "\n\n".join(parts)
    print("\n" + document)
    print(f"\nnew ours, seed {worst.seed} (its slowest run): every launch\n" + "\n".join(worst.log))
    (ss.HERE / "goodput_first.md").write_text(document + "\n")
    ss.plot(runs, grid_gpu_s, grid_best, ss.HERE / "goodput_first.png", names=names,
            ylabel="goodput of the recommendation / grid's best (0: no answer)",
            title=f"Goodput-first search, SIMULATED {ss.MODEL} on {ss.GPU}\nSLO {SLO}, met by no configuration")
    print(f"\nwrote goodput_first.md, goodput_first.png; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    ss.run_teed(main, ss.HERE / "goodput_first.txt")
