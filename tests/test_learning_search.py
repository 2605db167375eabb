"""Search that learns: a failing region is avoided, a hopeless trial is pruned early, finalists are
measured again with confidence intervals, capacity is found by bisection.

Real parts: Optuna on SQLite, the simulator's own start-up checks and failure classifier, `simulate`,
and a real `tune sim-serve` process replayed over HTTP by the load generator."""

from __future__ import annotations

import math
import statistics

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from tuner.engines.base import Launch
from tuner.engines.sim import SimEngine
from tuner.loadgen.metrics import RequestResult, summarize, tpot_s, wall_duration_s
from tuner.loadgen.replay import BenchConfig, ProgressSnapshot, chain, run_bench_sync
from tuner.loadgen.slo import parse_slo
from tuner.outcome import Outcome
from tuner.runner.server import ManagedServer, free_port
from tuner.simulator.config import EngineStartupError, SimConfig
from tuner.simulator.engine import SimArrival, SimScheduler, simulate
from tuner.space.knobs import load_space
from tuner.study.capacity import CapacityResult, find_capacity, good_fraction, poisson_at_rate
from tuner.study.feasibility import (
    PREDICTED_INFEASIBLE,
    FeasibilityModel,
    Observation,
    launches_avoided,
    observations_from_study,
    tell_infeasible,
)
from tuner.study.fidelity import RungScore, RungWatch, SuccessiveHalving, confidence_interval, remeasure, retimed
from tuner.study.pruning import DOMINATED, SLO_LOST, SloPruner, violations_to_lose
from tuner.workload.request import TraceRequest

LONG_CONTEXT = 121856  # the Mooncake slice's longest request, rounded up: KV for it needs ~15 GiB in bf16


def _requests(count: int, gap_s: float, input_tokens: int = 800, output_tokens: int = 48) -> list[TraceRequest]:
    return [TraceRequest(arrival_s=i * gap_s, input_tokens=input_tokens, output_tokens=output_tokens)
            for i in range(count)]


def _simulate_summary(config: SimConfig, requests: list[TraceRequest], slo) -> dict:
    report = simulate(config, [SimArrival(r.arrival_s, r.input_tokens, r.output_tokens) for r in requests])
    rows = [RequestResult(index=i, scheduled_s=r.arrival_s, sent_s=r.start_s, send_lag_s=0.0, finished_s=r.finish_s,
                          ttft_s=r.ttft, tpot_s=tpot_s(r.e2e, r.ttft, r.output_tokens), e2e_s=r.e2e,
                          prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens,
                          requested_output_tokens=r.output_tokens) for i, r in enumerate(report.results)]
    return summarize(rows, wall_duration_s(rows), slo).to_dict()


# ---- hidden constraints -----------------------------------------------------------------------

def _start(config: dict) -> str | None:
    """Start the simulated engine's core as `tune sim-serve` would; the failure class if it cannot."""
    try:
        SimScheduler(SimConfig(max_model_len=LONG_CONTEXT, **config))
    except EngineStartupError as exc:
        return SimEngine().classify_failure(1, str(exc))
    return None


def test_failing_region_is_learnt_and_then_not_launched(tmp_path):
    # at gpu_memory_utilization 0.3 a bf16 KV cache cannot hold one 121,856-token request: a region no
    # known constraint describes; only launches reveal it
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=2))  # keeps proposing the region
    space = load_space("sim")
    launched_failures, skipped, region_after_learning = [], [], []  # region proposals once 2 failures are known
    for _ in range(60):
        trial = study.ask()
        config = {"gpu_memory_utilization": trial.suggest_categorical("gpu_memory_utilization", [0.3, 0.9]),
                  "kv_cache_dtype": trial.suggest_categorical("kv_cache_dtype", ["auto", "fp8"]),
                  "quantization": trial.suggest_categorical("quantization", ["none", "fp8"]),
                  "max_num_seqs": trial.suggest_categorical("max_num_seqs", [16, 64, 256]),
                  "max_num_batched_tokens": trial.suggest_categorical("max_num_batched_tokens", [2048, 8192])}
        trial.set_user_attr("config", config)
        model = FeasibilityModel(space).fit(observations_from_study(study))
        verdict = model.verdict(config)
        in_region = config["gpu_memory_utilization"] == 0.3 and config["kv_cache_dtype"] == "auto"
        if in_region and model.failures >= 2:
            region_after_learning.append(verdict.launch)
        if not verdict.launch:
            tell_infeasible(study, trial, PREDICTED_INFEASIBLE, verdict.reason, verdict.p_fail)
            skipped.append(config)
            continue
        failure = _start(config)
        if failure:
            assert failure == Outcome.OOM_STARTUP
            trial.set_user_attr("failure", failure)  # what Tuner._record stores for a failed server
            study.tell(trial, state=TrialState.FAIL)
            launched_failures.append(config)
        else:
            study.tell(trial, config["max_num_seqs"])

    assert all(_start(config) == Outcome.OOM_STARTUP for config in skipped), "a feasible config was skipped"
    assert len(launched_failures) <= 4 and len(skipped) >= 2 * len(launched_failures)
    assert len(region_after_learning) >= 8 and sum(region_after_learning) <= len(region_after_learning) / 4
    assert launches_avoided(study) == len(skipped)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert all(t.constraints["launchable"] > 0 for t in pruned)  # samplers rank them below feasible trials
    assert "predicted to fail" in pruned[0].user_attrs["message"]


def _observations(pairs) -> list[Observation]:
    return [Observation(config, failed, Outcome.OOM_STARTUP if failed else None) for config, failed in pairs]


def test_feasibility_waits_for_enough_failures_and_knows_far_points():
    failed = {"gpu_memory_utilization": 0.3, "kv_cache_dtype": "auto", "max_num_seqs": 64}
    model = FeasibilityModel(min_failures=2).fit(_observations([(failed, True)]))
    assert model.verdict(failed).launch  # one failure is not a region yet
    model = FeasibilityModel(min_failures=2).fit(_observations([
        (failed, True), ({**failed, "max_num_seqs": 128}, True), ({**failed, "gpu_memory_utilization": 0.9}, False),
        ({**failed, "gpu_memory_utilization": 0.9, "kv_cache_dtype": "fp8"}, False)]))
    assert model.predict_fail_probability({**failed, "max_num_seqs": 96}) > 0.7
    assert not model.verdict({**failed, "max_num_seqs": 96}).launch
    assert model.verdict({**failed, "gpu_memory_utilization": 0.9, "max_num_seqs": 96}).launch


# ---- early stopping -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.sampled_from([50.0, 90.0, 95.0, 99.0, 99.9, 100.0]), st.randoms(use_true_random=False))
def test_enough_violations_make_the_percentile_exceed_the_limit_whatever_the_rest_do(n, percentile, rnd):
    limit = 1.0
    need = violations_to_lose(n, percentile)
    above = [limit + rnd.random() * 5 + 1e-9 for _ in range(need)]
    rest = [rnd.random() * limit for _ in range(n - need)]  # the most favourable finish: all below the limit
    assert np.percentile(above + rest, percentile) > limit


def _row(index: int, ttft: float, ok: bool = True) -> RequestResult:
    return RequestResult(index=index, scheduled_s=index, sent_s=index, send_lag_s=0.0, finished_s=index + ttft,
                         ttft_s=ttft if ok else None, tpot_s=0.01 if ok else None, e2e_s=ttft + 1 if ok else None,
                         output_tokens=10, requested_output_tokens=10, error=None if ok else "HTTP 500")


def _snapshot(rows: list[RequestResult], total: int) -> ProgressSnapshot:
    completed = sum(r.ok for r in rows)
    return ProgressSnapshot(elapsed_s=len(rows), total=total, sent=len(rows), completed=completed,
                            failed=len(rows) - completed, in_flight=0, p50_ttft_ms=None, p99_ttft_ms=None,
                            p50_tpot_ms=None, p99_tpot_ms=None, p99_e2e_ms=None, rows=tuple(rows))


def test_slo_pruner_counts_failures_and_proves_a_lower_bound():
    slo = parse_slo("ttft_p99=1s")
    pruner = SloPruner(slo, total_requests=100)
    assert not pruner(_snapshot([_row(0, 9.0), _row(1, 9.0)], total=2))  # the warm-up replay: not ours
    rows = [_row(i, 0.5) for i in range(50)] + [_row(50, 3.0), _row(51, 0.0, ok=False)]
    assert not pruner(_snapshot(rows, 100))  # 1 above 1 s: the p99 of up to 99 can still come back
    rows += [_row(52, 4.0)]
    assert pruner(_snapshot(rows, 100))  # 2 above 1 s of at most 99 completed: p99 is above it for sure
    assert pruner.decision.kind == SLO_LOST and "ttft_p99" in pruner.decision.reason
    assert pruner.constraint_values()["ttft_p99"] >= 3000.0 - 1000.0  # 2nd largest seen is a lower bound


def test_dominated_trial_is_pruned_when_it_cannot_beat_the_best():
    slo = parse_slo("ttft_p99=100s,tpot_p50=50ms")
    rows = [_row(i, 0.2) for i in range(10)]
    rows += [RequestResult(index=10 + i, scheduled_s=0, sent_s=0, send_lag_s=0, finished_s=1, ttft_s=0.2, tpot_s=0.2,
                           e2e_s=3.0, output_tokens=10, requested_output_tokens=10) for i in range(40)]
    # 100 requests over a 100 s span: at most 60 good -> 0.6 req/s, below the best 0.8
    pruner = SloPruner(slo, total_requests=100, best_goodput=0.8, span_s=100.0)
    assert pruner(_snapshot(rows, 100)) and pruner.decision.kind == DOMINATED
    assert not SloPruner(slo, total_requests=100, best_goodput=0.5, span_s=100.0)(_snapshot(rows, 100))


@pytest.fixture(scope="module")
def overloaded_sim(tmp_path_factory):
    """A real `tune sim-serve` with 2 running requests at most: it falls behind 20 req/s at once."""
    port = free_port()
    launch = Launch(config={"max_num_seqs": 2, "max_num_batched_tokens": 2048}, model="llama-3.1-8b",
                    port=port, api_key="k", time_scale=5.0, extra_args=("--max-model-len", "4096",
                                                                         "--startup-seconds", "0"))
    spec = SimEngine().server_spec(launch, load_space("sim"))
    server = ManagedServer(spec, tmp_path_factory.mktemp("sim") / "server.log")
    server.start()
    try:
        server.wait_ready(60)
        yield spec
    finally:
        server.stop()


def _bench(spec, slo, **extra) -> BenchConfig:
    return BenchConfig(url=spec.url, model=spec.served_model_name, api_key=spec.api_key,
                       clock_scale=spec.clock_scale, slo=slo, progress_interval_s=0.1, **extra)


def test_hopeless_trial_is_pruned_early_on_a_real_replay(overloaded_sim):
    slo = parse_slo("ttft_p90=300ms")
    requests = _requests(80, gap_s=0.05)
    pruner = SloPruner(slo, len(requests))
    result = run_bench_sync(_bench(overloaded_sim, slo), requests, on_progress=pruner)
    assert result.stopped_early and pruner.decision is not None
    assert pruner.decision.kind == SLO_LOST and "ttft_p90" in pruner.decision.reason
    assert result.not_finished > 0 and pruner.decision.finished < len(requests)
    assert pruner.decision.finished >= violations_to_lose(len(requests), 90.0)


def test_a_trial_within_its_slo_is_not_pruned(overloaded_sim):
    slo = parse_slo("ttft_p90=30s,tpot_p90=1s")
    requests = _requests(12, gap_s=0.5)
    pruner = SloPruner(slo, len(requests))
    result = run_bench_sync(_bench(overloaded_sim, slo), requests, on_progress=chain(pruner))
    assert not result.stopped_early and pruner.decision is None
    assert all(result.summary.slo_met.values())


def test_successive_halving_screens_out_a_poor_trial_at_the_first_rung(overloaded_sim):
    slo = parse_slo("ttft_p90=300ms")
    halving = SuccessiveHalving(fractions=(0.25, 0.5, 1.0), eta=2.0)
    for _ in range(3):  # three earlier trials met the SLO at the first rung
        halving.record(0, RungScore(True, 5.0))
    requests = _requests(60, gap_s=0.05)
    watch = RungWatch(halving, requests, slo, clock_scale=overloaded_sim.clock_scale)
    result = run_bench_sync(_bench(overloaded_sim, slo), requests, on_progress=watch)
    assert result.stopped_early and watch.decision is not None and watch.decision.kind == "screened_out"
    assert "rung 1" in watch.decision.reason and len(watch.scores) == 1
    assert not halving.promote(0, RungScore(False, 100.0))  # missing the SLO ranks below meeting it
    assert halving.promote(0, RungScore(True, 6.0))


def test_successive_halving_keeps_the_top_1_over_eta():
    halving = SuccessiveHalving(eta=2.0, min_peers=3)
    assert halving.promote(1, RungScore(True, 1.0)) and halving.promote(1, RungScore(True, 3.0))  # too few peers
    assert halving.promote(1, RungScore(True, 2.0))  # 2nd of 3: ceil(3/2) = 2 go on
    assert not halving.promote(1, RungScore(True, 1.5))  # 3rd of 4: only the top 2 go on
    assert halving.promote(2, RungScore(False, 0.0))  # the last rung ends the trial anyway
    assert [len(halving.scores[r]) for r in (1, 2)] == [4, 1]


# ---- finalists ---------------------------------------------------------------------------------

def test_finalists_are_measured_again_with_other_arrivals_and_a_confidence_interval():
    slo = parse_slo("ttft_p99=2s,tpot_p99=100ms")
    requests = _requests(40, gap_s=0.25)
    seen_arrivals = []

    def measure(retimed_requests):  # a fresh trial of the configuration on the simulator
        seen_arrivals.append(tuple(r.arrival_s for r in retimed_requests))
        return _simulate_summary(SimConfig(max_model_len=4096), retimed_requests, slo)

    result = remeasure({"max_num_seqs": 256}, measure, requests, repeats=3, seed=11)
    assert len(result.summaries) == 3 and result.seeds == (11, 12, 13)
    assert len(set(seen_arrivals)) == 3 and all(a != tuple(r.arrival_s for r in requests) for a in seen_arrivals)
    assert all(len(a) == len(requests) for a in seen_arrivals)
    ttft = result.estimates["p99_ttft_ms"]
    assert ttft.low <= ttft.mean <= ttft.high and len(ttft.values) == 3
    assert ttft.mean == pytest.approx(statistics.fmean(s["p99_ttft_ms"] for s in result.summaries))
    assert "goodput" in result.estimates and "output_throughput" in result.estimates


def test_confidence_interval_uses_student_t():
    estimate = confidence_interval([1.0, 2.0, 3.0])
    assert estimate.mean == 2.0
    assert estimate.half_width == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)


def test_retiming_keeps_the_requests_and_is_seeded():
    requests = _requests(200, gap_s=0.1)
    jittered = retimed(requests, seed=1)
    assert retimed(requests, seed=1) == jittered != retimed(requests, seed=2)
    assert [r.arrival_s for r in jittered] == sorted(r.arrival_s for r in jittered)
    poisson = retimed(requests, seed=1, mode="poisson")
    rate = (len(poisson) - 1) / (poisson[-1].arrival_s - poisson[0].arrival_s)
    assert 8.0 < rate < 12.5  # the trace's mean rate, 10 req/s


# ---- capacity ----------------------------------------------------------------------------------

def test_capacity_is_found_by_bisection_on_the_request_rate():
    slo = parse_slo("ttft_p99=1s,tpot_p99=60ms")
    requests = _requests(60, gap_s=1.0, input_tokens=2000, output_tokens=64)
    config = SimConfig(max_num_seqs=8, max_model_len=4096)

    def measure(rate: float) -> float:
        at_rate = poisson_at_rate(requests, rate, seed=0)
        return good_fraction(_simulate_summary(config, at_rate, slo), len(at_rate))

    result = find_capacity(measure, low=0.5, high=20.0, tolerance=0.05, attainment=0.95)
    assert result.capacity_rps is not None and not result.at_least
    holding = [p.rate for p in result.probes if p.holds]
    failing = [p.rate for p in result.probes if not p.holds]
    assert max(holding) == result.capacity_rps
    assert min(r for r in failing if r > result.capacity_rps) <= result.capacity_rps * 1.05 + 1e-9
    assert len(result.probes) <= 12


def test_capacity_search_from_the_trace_rate_brackets_by_doubling_and_halving():
    capacity = 3.0  # a server model: every rate up to 3 req/s holds, nothing above

    def measure(rate: float) -> float:
        return 1.0 if rate <= capacity else 0.5

    result = find_capacity(measure, low=0.25, high=64.0, tolerance=0.05, start=1.0)
    assert [p.rate for p in result.probes[:3]] == [1.0, 2.0, 4.0]  # doubled until it failed
    assert capacity * 0.95 <= result.capacity_rps <= capacity and not result.at_least
    assert str(result).endswith(f"req/s ({len(result.probes)} probes)")
    nothing = find_capacity(lambda rate: 0.0, low=0.25, high=64.0, start=1.0)
    assert nothing.capacity_rps is None and [p.rate for p in nothing.probes] == [1.0, 0.5, 0.25]
    assert str(nothing) == "below 0.25 req/s"  # the lowest rate probed, not the first
    assert str(CapacityResult.from_attrs(nothing.as_attrs())) == str(nothing)


def test_poisson_retiming_has_the_asked_rate():
    at_rate = poisson_at_rate(_requests(3000, gap_s=1.0), rate=4.0, seed=5)
    assert at_rate[0].arrival_s == 0.0
    assert at_rate[-1].arrival_s / (len(at_rate) - 1) == pytest.approx(0.25, rel=0.06)
    assert poisson_at_rate(at_rate, 4.0, seed=5) == at_rate


def test_the_pruner_and_the_rung_watch_are_replay_watchers():
    from tuner.loadgen.replay import ReplayWatcher

    trace = [TraceRequest(arrival_s=i * 0.1, input_tokens=100, output_tokens=10) for i in range(20)]
    watchers = [SloPruner(parse_slo("ttft_p99=1s"), 20), RungWatch(SuccessiveHalving(), trace, None)]
    for watcher in watchers:
        assert isinstance(watcher, ReplayWatcher) and watcher.decision is None
    assert not isinstance(lambda snapshot: False, ReplayWatcher)  # a bare callable has no `finish`
