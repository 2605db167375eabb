"""`tune --prescreen sim`: the prescreen loop on a real Optuna study, with a stand-in for the GPU
engine that is the simulator with constants the prescreen does not know."""

from __future__ import annotations

from dataclasses import asdict

import optuna
from optuna.trial import TrialState

from tuner.simulator.config import SimConfig
from tuner.simulator.constants import PerfConstants
from tuner.simulator.offline import replay
from tuner.space.constraints import violations
from tuner.study.prescreen import Prescreen
from tuner.workload.request import TraceRequest

# The "real" engine: slower GEMMs and KV reads than the prescreen's starting constants assume.
TRUE = PerfConstants(linear_mfu=0.4, gemm_ramp_tokens=600.0, attention_mfu=0.5, kv_bw_efficiency=0.5,
                     step_overhead_s=0.35e-3, fp8_kv_speedup=1.1)
TRACE = [TraceRequest(0.05 * i, 3000 + 500 * (i % 3), 60 + 10 * (i % 4)) for i in range(12)]
PROPOSALS = [{"max_num_seqs": 8, "max_num_batched_tokens": 2048}, {"max_num_seqs": 2, "max_num_batched_tokens": 1024},
             {"max_num_seqs": 32, "max_num_batched_tokens": 8192}, {"max_num_seqs": 1, "max_num_batched_tokens": 512},
             {"max_num_seqs": 64, "max_num_batched_tokens": 16384},
             {"max_num_seqs": 32, "max_num_batched_tokens": 4096, "attention_backend": "FLEX_ATTENTION",
              "kv_cache_dtype": "fp8"},
             {"max_num_seqs": 2, "max_num_batched_tokens": 768}, {"max_num_seqs": 16, "max_num_batched_tokens": 4096},
             {"max_num_seqs": 1, "max_num_batched_tokens": 1024}, {"max_num_seqs": 64, "max_num_batched_tokens": 8192}]


def real_engine(config: dict) -> dict:
    summary = replay(SimConfig(constants=TRUE, max_model_len=8192, engine_version="0.26.0", **config), TRACE).summary
    return asdict(summary)


def test_prescreen_launches_the_promising_refits_and_records_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    said: list[str] = []
    prescreen = Prescreen(gpu="h100", shape="llama-3.1-8b", engine_versions={"sim": "0.26.0"}, requests=TRACE,
                          max_model_len=8192, keep=0.5, warmup=3, fit_evals=15, run_dir=tmp_path / "run",
                          say=said.append)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for config in PROPOSALS:
        trial = study.ask()
        trial.set_user_attr("engine", "sim")
        trial.set_user_attr("config", config)
        if prescreen.screen(study, trial, "sim", config):
            summary = real_engine(config)
            trial.set_user_attr("summary", summary)
            study.tell(trial, [summary["output_throughput"], summary["p99_ttft_ms"], summary["p99_tpot_ms"]])

    trials = study.get_trials()
    launched = [t for t in trials if t.state == TrialState.COMPLETE]
    screened = [t for t in trials if t.state == TrialState.PRUNED]
    assert [t.number for t in launched[:3]] == [0, 1, 2]  # warm-up: the fit needs real results first
    assert 3 < len(launched) < len(PROPOSALS) and len(screened) == len(PROPOSALS) - len(launched)
    assert prescreen.screened == len(screened) and len(said) == len(screened)
    for trial in screened:
        assert trial.user_attrs["prescreened"] and trial.user_attrs["predicted"]
    flex = trials[5]
    assert flex.state == TrialState.PRUNED
    assert "FLEX_ATTENTION is not valid for this configuration" in flex.user_attrs["prescreened"]
    # the configuration that is really best was never screened out
    best = max(range(len(PROPOSALS)), key=lambda i: real_engine(PROPOSALS[i])["output_throughput"]
               if i != 5 else 0.0)
    assert trials[best].state == TrialState.COMPLETE
    # every real result refits: predictions made after the warm-up are close to what was measured
    for trial in launched[3:]:
        predicted, measured = trial.user_attrs["predicted"], trial.user_attrs["summary"]
        assert abs(predicted["output_throughput"] / measured["output_throughput"] - 1) < 0.1
    key = "h100-vllm-0.26.0-llama-3.1-8b"
    fitted = prescreen.calibrations[key]
    assert len(fitted.trials) >= len(launched) - 1  # fitted on every real result but maybe the last
    assert (tmp_path / "run" / f"calibration-{key}.json").exists()
    assert (tmp_path / "cache" / "servetune" / "calibration" / f"{key}.json").exists()


def test_the_defaults_baseline_always_launches_with_its_prediction(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prescreen = Prescreen(gpu="h100", shape="llama-3.1-8b", engine_versions={"vllm": "0.26.0"}, requests=TRACE,
                          max_model_len=8192, keep=0.01, warmup=0, say=lambda line: None)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    prescreen.scores = [1e9]  # everything predicted so far beats it by far
    trial = study.ask()
    assert prescreen.screen(study, trial, "vllm", {"max_num_seqs": 1, "max_num_batched_tokens": 512}, baseline=True)
    assert trial.user_attrs["predicted"]["output_throughput"] > 0
    assert prescreen.scores[1] == trial.user_attrs["predicted"]["output_throughput"]  # the bar proposals must pass
    refused = study.ask()
    config = {"attention_backend": "FLEX_ATTENTION", "kv_cache_dtype": "fp8"}
    assert not prescreen.screen(study, refused, "vllm", config)
    assert refused.user_attrs["predicted"]["refused"].startswith("ValueError: Selected backend")


def _one_real_result(study: optuna.Study, config: dict) -> None:
    trial = study.ask()
    trial.set_user_attr("engine", "vllm")
    trial.set_user_attr("config", config)
    summary = real_engine(config)
    trial.set_user_attr("summary", summary)
    study.tell(trial, [summary["output_throughput"], summary["p99_ttft_ms"], summary["p99_tpot_ms"]])


def test_a_cached_calibration_lets_screening_start_at_once(tmp_path, monkeypatch):
    """On the H200 (round 3) two poor proposals made while the defaults ran reached the GPU unscreened."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = "h100-vllm-0.26.0-llama-3.1-8b"

    def prescreen() -> Prescreen:
        return Prescreen(gpu="h100", shape="llama-3.1-8b", engine_versions={"vllm": "0.26.0"}, requests=TRACE,
                         max_model_len=8192, warmup=3, fit_evals=2, say=lambda line: None)

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _one_real_result(study, {"max_num_seqs": 8, "max_num_batched_tokens": 2048})
    cold = prescreen()
    cold.constants(study, "vllm")  # fits on the one result and caches it
    assert not cold.warmed_up(study, "vllm")  # nothing was cached before: 3 real results first
    assert (tmp_path / "servetune" / "calibration" / f"{key}.json").exists()
    fresh = optuna.create_study(directions=["maximize", "minimize", "minimize"])  # a later study, no result yet
    warm = prescreen()
    warm.constants(fresh, "vllm")
    assert warm.warmed_up(fresh, "vllm")


def test_with_an_slo_the_score_is_predicted_goodput_per_gpu():
    from tuner.loadgen.slo import parse_slo

    slo = parse_slo("ttft_p99=2s,tpot_p99=50ms")
    prescreen = Prescreen(gpu="h100", shape="llama-3.1-8b", engine_versions={}, requests=TRACE, slo=slo)
    fast_but_late = {"output_throughput": 9000.0, "goodput": 2.0}
    slower_in_time = {"output_throughput": 6000.0, "goodput": 8.0}
    assert prescreen.score(slower_in_time, {}) > prescreen.score(fast_but_late, {})
    assert prescreen.score(slower_in_time, {"tensor_parallel_size": 2}) == 4.0
    predicted = replay(SimConfig(constants=TRUE, max_model_len=8192, engine_version="0.26.0"), TRACE, slo).metrics()
    assert 0 <= predicted["goodput"] <= len(TRACE)
    assert "goodput" not in replay(SimConfig(constants=TRUE, max_model_len=8192, engine_version="0.26.0"),
                                   TRACE).metrics()


def test_with_a_cached_calibration_the_simulator_s_best_guesses_launch_first(tmp_path, monkeypatch):
    """Round 3 on the H200 spent its 6 minutes on the sampler's random start; the simulator's best guesses
    (above the defaults, distinct, best first) now queue right after the defaults and are never screened."""
    from tuner.hardware.gpus import get_gpu
    from tuner.loadgen.slo import parse_slo
    from tuner.models.shapes import PRESETS
    from tuner.space.constraints import Context
    from tuner.space.knobs import load_space

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spaces = {"vllm": load_space("vllm")}
    context = Context(gpus=1, gpu=get_gpu("h100"), model=PRESETS["llama-3.1-8b"], max_model_len=8192)

    def prescreen() -> Prescreen:
        return Prescreen(gpu="h100", shape="llama-3.1-8b", engine_versions={"vllm": "0.26.0"}, requests=TRACE,
                         max_model_len=8192, slo=parse_slo("ttft_p99=2s,tpot_p99=60ms"), keep=0.01, fit_evals=2,
                         say=lambda line: None)

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    assert prescreen().best_guesses(study, spaces, context, samples=4, seed=1) == []  # nothing cached: no guess
    _one_real_result(study, {"max_num_seqs": 8, "max_num_batched_tokens": 2048})
    prescreen().constants(study, "vllm")  # fits and caches this hardware's calibration

    fresh = optuna.create_study(directions=["maximize"])
    guessing = prescreen()
    guesses = guessing.best_guesses(fresh, spaces, context, count=2, samples=16, seed=1)
    assert 1 <= len(guesses) <= 2 and len({tuple(sorted(p.items())) for p, _ in guesses}) == len(guesses)
    defaults = spaces["vllm"].defaults()
    bar = guessing.score(guessing.predict(fresh, "vllm", defaults), defaults)
    scores = []
    for params, why in guesses:
        assert "the simulator's best guess" in why
        config = {**defaults, **params}
        assert not violations(config, context)
        scores.append(guessing.score(guessing.predict(fresh, "vllm", config), config))
    assert all(score > bar for score in scores) and scores == sorted(scores, reverse=True)
    # queued with `seeded`, a guess launches even when the cut would keep it off the GPU
    guessing.scores = [1e9, 1e9]
    fresh.enqueue_trial(guesses[-1][0], user_attrs={"seeded": guesses[-1][1]})
    trial = fresh.ask()
    assert guessing.screen(fresh, trial, "vllm", {**defaults, **trial.params})
    plain = fresh.ask()
    assert not guessing.screen(fresh, plain, "vllm", {**defaults, **guesses[-1][0]})
