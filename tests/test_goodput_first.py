"""Goodput-first search: it always answers, never stops a trial that could end best, and says whether the
answer beats the defaults beyond noise, per GPU, and whether it changes the model's outputs."""

from __future__ import annotations

from pathlib import Path

from tuner.loadgen.metrics import RequestResult, summarize
from tuner.loadgen.replay import ProgressSnapshot
from tuner.loadgen.slo import parse_slo
from tuner.outcome import missing_module
from tuner.records.objectives import Objectives, default_objectives
from tuner.records.pareto import Point, pick
from tuner.records.recommend import recommend
from tuner.records.reliability import unreliable_reasons
from tuner.runner.trial import TrialOutcome
from tuner.study.pruning import DOMINATED, SLO_LOST, SloPruner
from tuner.study.tune import TuneOptions, Tuner
from tuner.workload.request import TraceRequest

SLO = parse_slo("ttft_p99=1s")


def _row(index: int, ttft: float) -> RequestResult:
    return RequestResult(index=index, scheduled_s=index, sent_s=index, send_lag_s=0.0, finished_s=index + ttft + 1,
                         ttft_s=ttft, tpot_s=0.01, e2e_s=ttft + 1, output_tokens=10, requested_output_tokens=10)


def _snapshot(rows: list[RequestResult], total: int) -> ProgressSnapshot:
    return ProgressSnapshot(elapsed_s=len(rows), total=total, sent=len(rows), completed=len(rows), failed=0,
                            in_flight=0, p50_ttft_ms=None, p99_ttft_ms=None, p50_tpot_ms=None, p99_tpot_ms=None,
                            p99_e2e_ms=None, rows=tuple(rows))


def test_a_trial_with_bad_early_requests_that_ends_best_is_not_stopped():
    # 100 requests, 1/s: the first 10 wait 5 s for their first token (a cold cache, a burst), the rest 0.2 s.
    # Its p99 TTFT is lost after 2 of them, yet it ends with 90 good requests: the best goodput of the study.
    rows = [_row(i, 5.0 if i < 10 else 0.2) for i in range(100)]
    best_so_far = 0.8  # req/s: the best final goodput known, from a trial that also missed the SLO
    old_rule = SloPruner(SLO, 100, best_goodput=best_so_far, span_s=99.0, stop_on_slo_lost=True)
    new_rule = SloPruner(SLO, 100, best_goodput=best_so_far, span_s=99.0, stop_on_slo_lost=False)
    stopped_old = next(n for n in range(1, 101) if old_rule(_snapshot(rows[:n], 100)))
    assert stopped_old <= 3 and old_rule.decision.kind == SLO_LOST  # what round 1 did: its best answer thrown away
    assert not any(new_rule(_snapshot(rows[:n], 100)) for n in range(1, 101))
    final = summarize(rows, duration_s=max(r.finished_s for r in rows), slo=SLO)
    assert final.goodput > best_so_far and not final.slo_met["ttft_p99"]


def test_a_trial_is_stopped_when_its_goodput_bound_falls_below_the_best_and_the_bound_is_recorded():
    rows = [_row(i, 5.0) for i in range(30)]  # every request misses: at most 70 of 100 can be good
    pruner = SloPruner(SLO, 100, best_goodput=0.75, span_s=100.0, stop_on_slo_lost=False)
    stop = next(n for n in range(1, 31) if pruner(_snapshot(rows[:n], 100)))
    assert pruner.decision.kind == DOMINATED and stop == 26  # (100 - 26) / 100 = 0.74 < 0.75
    attrs = pruner.decision.as_attrs()
    assert attrs["goodput_upper_bound"] == 0.74 and attrs["best_goodput"] == 0.75


def _point(number: int, goodput: float, ttft_p99: float, *, baseline: bool = False, gpus: int = 1,
           feasible: bool = False, served: float = 1.0, config: dict | None = None) -> Point:
    summary = {"goodput": goodput, "output_throughput": 100.0 * goodput, "request_throughput": served,
               "p99_ttft_ms": ttft_p99, "p99_tpot_ms": 20.0, "slo": str(SLO), "slo_value_ms": {"ttft_p99": ttft_p99}}
    return Point(number=number, engine="sim", config=config or {"max_num_seqs": number}, summary=summary,
                 command=["serve"], feasible=feasible, baseline=baseline, gpus=gpus)


def test_with_no_configuration_meeting_the_slo_the_best_goodput_is_recommended_with_what_it_misses():
    points = [_point(0, 0.9, 9400.0, baseline=True), _point(1, 3.2, 4400.0), _point(2, 1.5, 2500.0)]
    answer = recommend(points, Objectives(("goodput",)), SLO)
    assert answer is not None and answer.point.number == 1
    text = "\n".join(answer.lines())
    assert "no configuration met every SLO percentile" in text
    assert "ttft_p99 4400 ms > limit 1000 ms (+340 %)" in text


def test_a_configuration_meeting_the_slo_wins_over_a_higher_goodput_that_misses_it():
    points = [_point(0, 3.0, 4400.0, baseline=True), _point(1, 1.0, 800.0, feasible=True)]
    assert pick(points, Objectives(("goodput",))).number == 1


def test_ties_on_goodput_are_broken_by_the_smallest_slo_miss():
    points = [_point(0, 0.0, 9000.0, baseline=True), _point(1, 0.0, 1500.0), _point(2, 0.0, 30000.0)]
    assert pick(points, Objectives(("goodput",))).number == 1


def _finals(best: list[float], defaults: list[float], best_number: int = 1) -> dict[int, dict]:
    from tuner.study.fidelity import confidence_interval

    def attrs(values: list[float]) -> dict:
        e = confidence_interval(values)
        return {"remeasured": {"repeats": len(values), "estimates": {
            "goodput": {"mean": e.mean, "low": e.low, "high": e.high, "values": list(e.values)}}}}
    return {best_number: attrs(best), 0: attrs(defaults)}


def test_a_recommendation_within_noise_of_the_defaults_says_so():
    points = [_point(0, 1.0, 900.0, baseline=True, feasible=True), _point(1, 1.1, 800.0, feasible=True)]
    noisy = recommend(points, Objectives(("goodput",)), SLO, _finals([1.1, 0.7, 1.5], [1.0, 0.6, 1.4]))
    assert noisy is not None and noisy.versus is not None and not noisy.versus.significant
    assert "no significant improvement over the defaults" in "\n".join(noisy.lines())
    clear = recommend(points, Objectives(("goodput",)), SLO, _finals([4.2, 4.3, 4.1], [1.6, 1.5, 1.7]))
    assert clear is not None and clear.versus is not None and clear.versus.significant
    assert "better than the defaults" in "\n".join(clear.lines()) and clear.versus.ratio > 2.5


def test_a_two_gpu_configuration_is_compared_with_a_one_gpu_default_per_gpu():
    objectives = default_objectives(SLO, per_gpu=True)
    assert objectives.names == ("goodput_per_gpu",)
    assert default_objectives(None, per_gpu=True).names == ("output_throughput_per_gpu", "ttft_p99", "tpot_p99")
    assert default_objectives(None, per_gpu=False).primary == "output_throughput"
    default = _point(0, 2.0, 800.0, baseline=True, feasible=True)
    doubled = _point(1, 3.0, 700.0, gpus=2, feasible=True, config={"tensor_parallel_size": 2})
    assert pick([default, doubled], objectives).number == 0  # 1.5 req/s per GPU < 2.0
    better = _point(2, 5.0, 700.0, gpus=2, feasible=True, config={"tensor_parallel_size": 2})
    assert pick([default, doubled, better], objectives).number == 2  # 2.5 per GPU
    assert objectives.values(better.summary, gpus=2) == [2.5]
    answer = recommend([default, better], objectives, SLO, _finals([5.0, 5.1, 4.9], [2.0, 2.1, 1.9], best_number=2))
    assert answer is not None and answer.versus is not None
    assert answer.versus.metric == "goodput_per_gpu" and abs(answer.versus.ratio - 1.25) < 0.01


def test_when_the_trace_is_the_bound_ties_go_to_fewer_gpus_then_lower_latency():
    offered = 1.0  # req/s the trace offers; every server below finishes them all
    points = [_point(0, 0.99, 900.0, baseline=True, feasible=True), _point(1, 1.0, 300.0, feasible=True),
              _point(2, 1.01, 200.0, gpus=2, feasible=True)]
    answer = recommend(points, Objectives(("goodput",)), SLO, offered_rate=offered)
    assert answer is not None and answer.point.number == 1 and answer.load_bound
    assert "--time-scale" in "\n".join(answer.lines())


def test_a_recommendation_that_changes_outputs_says_so():
    points = [_point(0, 1.0, 900.0, baseline=True, feasible=True),
              _point(1, 2.0, 800.0, feasible=True, config={"quantization": "fp8"})]
    answer = recommend(points, Objectives(("goodput",)), SLO, changes_outputs=("quantization=fp8",))
    assert answer is not None and "CHANGES MODEL OUTPUTS: quantization=fp8" in "\n".join(answer.lines())


def test_client_lag_and_a_lagging_simulator_make_a_measurement_unreliable():
    assert unreliable_reasons({"p99_send_lag_ms": 1.0}, {"clock_lag_max_seconds": 0.2}) == []
    reasons = unreliable_reasons({"p99_send_lag_ms": 12.0}, {"clock_lag_max_seconds": 3.0})
    assert len(reasons) == 2 and "send lag p99 12.0 ms" in reasons[0]
    unreliable = Point(number=1, engine="sim", config={}, summary=_point(1, 5.0, 500.0).summary, command=[],
                       feasible=True, baseline=False, unreliable=tuple(reasons))
    assert pick([unreliable, _point(0, 1.0, 500.0, baseline=True, feasible=True)],
                Objectives(("goodput",))).number == 0


def test_a_missing_module_takes_its_value_out_of_the_space_for_the_rest_of_the_study(tmp_path: Path):
    assert missing_module("ModuleNotFoundError: No module named 'compressed_tensors'") == "compressed_tensors"
    requests = [TraceRequest(arrival_s=float(i), input_tokens=64, output_tokens=8) for i in range(4)]
    options = TuneOptions(workload=tmp_path / "t.jsonl", requests=requests, workload_digest="x", engines=["sim"],
                          model="llama-3.1-8b", shape=None, gpus=1, gpu="h100", slo=SLO, seed=1,
                          study_name="env", storage=f"sqlite:///{tmp_path / 'optuna.db'}", out_dir=tmp_path,
                          fix=["speculative_method=none"], quiet=True)
    tuner = Tuner(options)
    tuner.open_study()
    first = tuner._propose(largest_node=1)  # the defaults
    assert first is not None and first.baseline
    session = tuner._session
    trial = session.ask()
    config = {**first.config, "quantization": "fp8"}
    session.save(trial.number, engine="sim", config=config)
    spec = tuner._trial_spec(trial.number, "sim", config, baseline=False)
    failed = TrialOutcome(number=trial.number, ok=False, command=["serve"], failure="environment",
                          message="ModuleNotFoundError: No module named 'compressed_tensors'")
    tuner._record(spec, failed, "", total=10)
    assert ["quantization", "fp8"] == session.record().excluded[0][:2]
    proposals = [tuner._propose(largest_node=1) for _ in range(25)]
    assert all(p.config.get("quantization") != "fp8" for p in proposals if p is not None)
    assert tuner.excluded_hits > 0  # fp8 was proposed again, and told infeasible instead of launched
    records = [t for t in session.study.trials if t.user_attrs.get("message", "").startswith("left the space")]
    assert records and all(t.user_attrs["config"]["quantization"] == "fp8" for t in records)
    assert session.study.trials[trial.number].user_attrs["failure"] == "environment"
