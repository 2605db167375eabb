"""The whole job on the simulator: Optuna study, Ray actors, MLflow store, Pareto, export, resume."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tuner.cli import main
from tuner.export.command import choose, load_study, shell_line
from tuner.models.shapes import get_shape
from tuner.outcome import Outcome
from tuner.records.pareto import completed_points
from tuner.records.trial import StudyRecord, records
from tuner.space.fit import fit_to_model
from tuner.space.flags import parse_flags
from tuner.space.knobs import load_space

WORKLOAD = Path(__file__).parents[1] / "workloads" / "mooncake_conversation_head300.jsonl"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]  # conftest.py: Ray, 8 logical GPUs


def _tune_args(tmp_path: Path, name: str = "e2e") -> list[str]:
    return ["--workload", str(WORKLOAD), "--rows", "24", "--time-scale", "3", "--engine", "sim", "--gpus", "2",
            "--sim-time-scale", "20", "--study-name", name, "--out", str(tmp_path / "runs"), "--seed", "7"]


def _tune(tmp_path: Path, *extra: str, name: str = "e2e") -> int:
    return main([*_tune_args(tmp_path, name), *extra])


# the simulated start-up: 1 simulated s, not 20 (1 s of wall time a trial at --sim-time-scale 20); for the
# tests that do not read the trials' commands back
QUICK_START = "--engine-arg=--startup-seconds 1"


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"


def test_study_runs_records_resumes_and_exports(tmp_path, capsys):
    assert _tune(tmp_path, "--trials", "4", "--slo", "ttft_p99=60s") == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "recommended (trial" in out and "SIMULATED" in out
    study = load_study("e2e", _storage(tmp_path))
    finished = [t for t in study.trials if t.state.is_finished() and t.user_attrs.get("failure") != "constraint"]
    assert len(finished) == 4
    assert study.trials[0].user_attrs["baseline"] is True
    assert study.trials[0].user_attrs["command"][:2] == ["tune", "sim-serve"]
    run_dir = tmp_path / "runs" / "e2e"
    assert (run_dir / "pareto.png").stat().st_size > 1000 and (run_dir / "pareto.html").exists()

    # MLflow: one parent run for the study, one child per trial, with params, metrics and artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("servetune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("servetune.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("servetune.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    complete = [c for c in children if c.data.tags["servetune.state"] == "COMPLETE"]
    assert complete, "at least one trial should complete on the simulator"
    assert complete[0].data.metrics["output_throughput"] > 0
    assert "p99_ttft_ms" in complete[0].data.metrics and "goodput" in complete[0].data.metrics
    assert complete[0].data.params["command"].startswith("tune sim-serve")
    assert complete[0].data.tags["simulated"] == "true" and len(complete[0].data.tags["trace_sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(complete[0].info.run_id)}
    assert {"server.log", "requests.csv", "summary.json"} <= artifacts  # what a completed trial measured
    assert "pareto.png" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}

    # export: the recommended command parses back into the trial's configuration
    space = load_space("sim")
    fit_to_model(space, get_shape("llama-3.1-8b"))  # as tune fits it: a dense model has no expert knobs
    for point in completed_points(study):
        argv = shlex.split(shell_line(point))
        if not point.baseline:
            assert parse_flags(space, argv) == point.config
    best = choose(study, None, "throughput")
    assert main(["export", "--study", "e2e", "--storage", _storage(tmp_path)]) == 0
    exported = capsys.readouterr().out.strip().splitlines()
    assert exported[-1] == shell_line(best)  # after a comment line when the configuration changes outputs
    assert all(line.startswith("# servetune: ") for line in exported[:-1])

    # the same command again resumes: nothing re-runs, the report is printed again without starting Ray
    # or MLflow (seconds to import); asking for one more runs one more
    again = subprocess.run([sys.executable, "-X", "importtime", "-m", "tuner", *_tune_args(tmp_path),
                            "--trials", "4", "--slo", "ttft_p99=60s"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already has 4 finished trials" in again.stdout and "Pareto front" in again.stdout
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "optuna" in imported and not imported & {"ray", "mlflow"}
    assert _tune(tmp_path, "--trials", "5", "--slo", "ttft_p99=60s") == 0
    study = load_study("e2e", _storage(tmp_path))
    assert sum(1 for t in study.trials if t.state.is_finished() and t.user_attrs.get("failure") != "constraint") == 5


def test_failed_trials_are_recorded_with_cause_and_the_study_goes_on(tmp_path, capsys):
    # a 70B model does not fit one simulated H100 at 70% memory: every launch fails at start-up
    code = main(["--workload", str(WORKLOAD), "--rows", "8", "--engine", "sim", "--model", "llama-3.1-70b",
                 "--gpus", "1", "--fix", "tensor_parallel_size=1", "--fix", "gpu_memory_utilization=0.7",
                 "--trials", "2", "--study-name", "oom", "--out", str(tmp_path / "runs"), "--no-mlflow"])
    assert code == 0
    out = capsys.readouterr().out
    assert "no trial completed" in out
    study = load_study("oom", _storage(tmp_path))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and t.user_attrs.get("failure") != Outcome.CONSTRAINT]
    assert len(failed) == 2
    assert all(t.user_attrs["failure"] == Outcome.OOM_STARTUP for t in failed)
    assert all("No available memory for the cache blocks" in t.user_attrs["log_tail"] for t in failed)


def test_interrupted_trial_is_run_again(tmp_path, capsys):
    assert _tune(tmp_path, "--trials", "1", "--no-mlflow", QUICK_START, name="crash") == 0
    study = load_study("crash", _storage(tmp_path))
    # what a `tune` killed mid-trial leaves behind: a RUNNING trial in the storage
    orphan = study.ask({"max_num_seqs": optuna.distributions.IntDistribution(8, 1024, log=True)})
    assert study.trials[orphan.number].state == optuna.trial.TrialState.RUNNING
    assert _tune(tmp_path, "--trials", "2", "--no-mlflow", QUICK_START, name="crash") == 0
    assert "1 interrupted trial(s) will run again" in capsys.readouterr().out
    study = load_study("crash", _storage(tmp_path))
    assert study.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert orphan.number in StudyRecord.of(study).interrupted
    assert study.trials[orphan.number + 1].params["max_num_seqs"] == orphan.params["max_num_seqs"]
    ran = [r for r in records(study) if r.state in ("COMPLETE", "FAIL", "PRUNED") and r.failure not in
           (Outcome.CONSTRAINT, Outcome.INTERRUPTED)]
    assert len(ran) == 2


def test_resumed_seeded_study_does_not_repeat_its_first_proposals(tmp_path):
    # the defaults and one sampled configuration, then one more: a sampler seeded again as at the start
    # would propose the first sampled configuration again
    assert _tune(tmp_path, "--trials", "2", "--no-mlflow", "--sampler", "random", QUICK_START, name="seeded") == 0
    assert _tune(tmp_path, "--trials", "3", "--no-mlflow", "--sampler", "random", QUICK_START, name="seeded") == 0
    study = load_study("seeded", _storage(tmp_path))
    configs = [tuple(sorted(t.params.items())) for t in study.trials if t.params]
    assert len(configs) >= 2 and len(configs) == len(set(configs))


FAILING_REGION = """\
engine: sim
extends: common.yaml
knobs:
  gpu_memory_utilization: {flag: --gpu-memory-utilization, type: categorical, choices: [0.15, 0.9], default: 0.92}
  max_num_seqs: {flag: --max-num-seqs, type: categorical, choices: [64, 128], default: 1024}
"""


def test_a_failing_region_is_learnt_and_not_launched_again(tmp_path, capsys):
    # 16 GB of Llama-3.1-8B weights do not fit 15 % of an H100: those launches fail at start-up
    space = tmp_path / "space.yaml"
    space.write_text(FAILING_REGION)
    assert _tune(tmp_path, "--trials", "8", "--no-mlflow", "--sampler", "random", "--space", str(space),
                 "--gpus", "1", QUICK_START, name="region") == 0
    assert "launch(es) avoided" in capsys.readouterr().out
    study = load_study("region", _storage(tmp_path))
    failed = [t for t in study.trials if t.user_attrs.get("failure") == Outcome.OOM_STARTUP]
    avoided = [t for t in study.trials if t.user_attrs.get("failure") == "predicted_infeasible"]
    assert len(failed) >= 2 and avoided
    assert all(t.user_attrs["config"]["gpu_memory_utilization"] == 0.15 for t in failed + avoided)
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in avoided)
    run_dir = tmp_path / "runs" / "region"
    assert not any((run_dir / f"trial-{t.number:04d}").exists() for t in avoided)  # never launched


QUEUEING = """\
engine: sim
extends: common.yaml
knobs:
  max_num_seqs: {flag: --max-num-seqs, type: categorical, choices: [2, 256], default: 1024}
"""


def test_a_hopeless_trial_is_stopped_early_and_recorded_as_pruned(tmp_path, capsys):
    # two sequences at a time queue the slice's long prompts far past a 20 s TTFT p99; 256 stay near 15 s.
    # One GPU: the defaults (which meet the SLO) finish first, so "SLO certainly lost" may stop the others
    space = tmp_path / "space.yaml"
    space.write_text(QUEUEING)
    assert _tune(tmp_path, "--trials", "6", "--no-mlflow", "--sampler", "random", "--space", str(space),
                 "--slo", "ttft_p99=20s", "--gpus", "1", QUICK_START, name="hopeless") == 0
    out = capsys.readouterr().out
    assert "stopped early" in out and "GPU-s of replay not run" in out
    study = load_study("hopeless", _storage(tmp_path))
    stopped = [t for t in study.trials if "stopped" in t.user_attrs]
    assert stopped and all(t.state == optuna.trial.TrialState.PRUNED for t in stopped)
    for trial in stopped:
        assert trial.user_attrs["config"]["max_num_seqs"] == 2
        record = trial.user_attrs["stopped"]
        assert record["kind"] in ("slo_lost", "dominated")
        assert "ttft_p99" in record["reason"] or record["goodput_upper_bound"] < record["best_goodput"]
        assert record["finished"] < 24 and record["saved_gpu_s"] >= 0  # 0 once it outlasted the defaults' replay
        assert trial.user_attrs["constraints"][0] > 0  # the samplers see it missed the SLO
        rows = (tmp_path / "runs" / "hopeless" / f"trial-{trial.number:04d}" / "requests.csv").read_text()
        assert len(rows.splitlines()) - 1 < 24  # the replay really stopped
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert any(t.user_attrs["config"].get("max_num_seqs") == 256 for t in completed)
    assert len(completed) + len(stopped) == 6  # a stopped trial counts as one of the trials asked for
    report = (tmp_path / "runs" / "hopeless" / "report.md").read_text()
    assert "stopped early: " in report


def test_finalists_are_measured_again_and_their_capacity_found(tmp_path, capsys):
    assert _tune(tmp_path, "--trials", "4", "--no-mlflow", "--halving", "--slo", "ttft_p99=20s", QUICK_START,
                 "--finalists", "1", "--repeats", "3", "--capacity", "--attainment", "0.9", name="finals") == 0
    out = capsys.readouterr().out
    assert "finalists measured again" in out
    study = load_study("finals", _storage(tmp_path))
    finals = study.user_attrs["finals"]
    if len(finals) == 2:  # the best configuration, and the defaults measured again beside it
        defaults = finals.pop("0")
        assert defaults["remeasured"]["repeats"] == 3 and "capacity" not in defaults
    (number, final), = finals.items()
    estimate = final["remeasured"]["estimates"]["output_throughput"]
    assert final["remeasured"]["repeats"] == 3 and len(set(estimate["values"])) == 3
    assert estimate["low"] < estimate["mean"] < estimate["high"]
    run_dir = tmp_path / "runs" / "finals"
    arrivals = [[line.split(",")[1] for line in (run_dir / f"trial-{int(number):04d}-repeat-{k}" / "requests.csv")
                 .read_text().splitlines()[1:]] for k in (1, 2, 3)]
    assert all(len(a) == 24 for a in arrivals) and arrivals[0] != arrivals[1] != arrivals[2]  # re-timed
    capacity = final["capacity"]
    holding = [rate for rate, _, holds in capacity["probes"] if holds]
    failing = [rate for rate, _, holds in capacity["probes"] if not holds]
    assert capacity["capacity_rps"] == max(holding) and (capacity["at_least"] or min(failing) > max(holding))
    # successive halving scored every trial that ran to its end at each of the three rungs
    complete = [t for t in study.trials
                if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("baseline")]
    assert complete and all(len(t.user_attrs["rung_scores"]) == 3 for t in complete)
    assert "Finalists measured again" in (run_dir / "report.md").read_text()
    # the re-measurements hold and measure GPUs too: the campaign counts them
    campaign = json.loads((run_dir / "campaign.json").read_text())
    labels = sorted(span["label"] for span in campaign["spans"] if span["number"] == int(number))
    assert labels == ["", "capacity", "repeat-1", "repeat-2", "repeat-3"]
    assert campaign["measuring_gpu_s"] == round(sum(span["measure_s"] * span["gpus"] for span in campaign["spans"]), 1)
    assert campaign["ended_at"] >= max(span["ended_at"] for span in campaign["spans"])
    assert campaign["trials"] == 4 and campaign["remeasurements"] == len(campaign["spans"]) - 4 >= 4
