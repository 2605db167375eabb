"""`tune report`: one study's report (local MLflow store and a real `mlflow server`), goodput under
another SLO from the trials' rows, importances, failures, and two studies side by side (H100 vs A100)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tuner.cli import main
from tuner.export.command import choose, load_study
from tuner.loadgen.slo import parse_slo
from tuner.records.trial import StudyRecord
from tuner.report.goodput import goodput_under
from tuner.report.results import load_result
from tuner.report.write import write_study_report

WORKLOAD = Path(__file__).parents[1] / "workloads" / "mooncake_conversation_head300.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_server, local_ray):
    """Two simulated studies in one storage: the same model and trace on H100 and on A100 (conftest.py's
    MLflow server starts meanwhile)."""
    out = tmp_path_factory.mktemp("runs")
    for gpu, extra in (("h100", ["--trials", "3"]), ("a100", ["--trials", "2", "--no-mlflow"])):
        code = main(["--workload", str(WORKLOAD), "--rows", "12", "--time-scale", "3", "--engine", "sim",
                     "--model", "llama-3.2-1b", "--gpu", gpu, "--gpus", "1", "--sim-time-scale", "20",
                     "--seed", "5", "--slo", "ttft_p99=60s", "--study-name", gpu, "--out", str(out), "--quiet",
                     *extra])
        assert code == 0
    return out


def _storage(out: Path) -> str:
    return f"sqlite:///{out / 'optuna.db'}"


def _parent_run(client: MlflowClient, study: str):
    experiment = client.get_experiment_by_name("servetune")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`servetune.study` = '{study}' and tags.`servetune.kind` = 'study'")
    assert len(runs) == 1
    return runs[0]


# The four checks on the two studies are one test: under pytest-xdist, tests of a module go to both
# workers, and each would run the module's fixtures (two studies and an MLflow server, 45 s) again
def test_reports_of_the_two_studies(runs, mlflow_server, tmp_path, capsys):
    (tmp_path / "server").mkdir()
    (tmp_path / "side").mkdir()
    _report_of_one_study_logged_to_the_local_store(runs, capsys)
    _report_logged_to_a_real_mlflow_server(runs, mlflow_server, tmp_path / "server", capsys)
    _goodput_under_another_slo_is_recomputed_from_the_rows(runs)
    _two_studies_side_by_side(runs, tmp_path / "side")


def _report_of_one_study_logged_to_the_local_store(runs, capsys):
    assert (runs / "h100" / "report.md").exists()  # `tune` itself wrote it at the end of the run
    assert main(["report", "h100", "--storage", _storage(runs)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "logged to MLflow" in out
    text = (runs / "h100" / "report.md").read_text()
    study = load_study("h100", _storage(runs))
    best = choose(study, None, "throughput")
    assert "SIMULATED" in text and "1 × h100" in text
    for heading in ("## Pareto front", "## Best point vs the engine's defaults", "## Goodput under the SLO",
                    "## Parameter importances", "## Failed and pruned trials"):
        assert heading in text
    objective = StudyRecord.of(study).objectives[0]
    assert objective == "goodput"  # the default with an SLO on one GPU
    assert (f"Trial {best.number} (best goodput within the SLO)" in text
            or f"Trial {best.number} (best goodput; no trial met every SLO percentile)" in text)
    assert "0 (defaults)" in text  # the baseline row
    assert "too few trials for parameter importances: 2 completed" in text
    for name in ("pareto.png", "importance.png"):
        assert (runs / "h100" / name).read_bytes()[:8] == PNG_MAGIC
    assert "<svg" in (runs / "h100" / "pareto.html").read_text()

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    parent = _parent_run(client, "h100")
    assert {"report.md", "pareto.png", "importance.png", "pareto.html"} <= {a.path for a in client.list_artifacts(
        parent.info.run_id)}
    assert parent.data.metrics["best_output_throughput"] == pytest.approx(best.value("output_throughput"))


def _report_logged_to_a_real_mlflow_server(runs, mlflow_server, tmp_path, capsys):
    uri = mlflow_server.wait_ready()
    assert main(["report", "h100", "--storage", _storage(runs), "--mlflow-uri", uri, "--out", str(tmp_path)]) == 0
    assert "logged to MLflow" in capsys.readouterr().out
    client = MlflowClient(uri)
    parent = _parent_run(client, "h100")
    assert {"report.md", "pareto.png", "importance.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    fetched = Path(client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path / "fetched")))
    assert fetched.read_text() == (tmp_path / "report.md").read_text()
    assert parent.data.metrics["trials_completed"] == 3
    assert not (tmp_path / "mlflow-buffer.jsonl").exists() and not (runs / "h100" / "mlflow-buffer.jsonl").exists()


def _goodput_under_another_slo_is_recomputed_from_the_rows(runs):
    study = load_study("h100", _storage(runs))
    result = load_result(study, run_dir=runs / "h100")
    point = result.best
    stored = point.summary["goodput"]
    assert stored > 0
    # a target every request meets changes nothing; one no request meets leaves no goodput
    assert goodput_under(parse_slo("ttft_p99=60s,e2e_p99=3600s"), point, runs / "h100") == pytest.approx(stored)
    assert goodput_under(parse_slo("ttft_p99=1ms"), point, runs / "h100") == 0
    assert goodput_under(parse_slo("ttft_p99=1ms"), point, None) is None  # no rows: unknown, not zero

    assert main(["report", "h100", "--storage", _storage(runs), "--slo", "ttft_p99=1ms", "--no-mlflow",
                 "--out", str(runs / "strict")]) == 0
    text = (runs / "strict" / "report.md").read_text()
    assert "`ttft_p99=1ms` (given to the report)" in text
    assert "no configuration met every SLO percentile" in text and "misses ttft_p99" in text


def _two_studies_side_by_side(runs, tmp_path):
    assert main(["report", "h100", "a100", "--storage", _storage(runs), "--out", str(tmp_path), "--no-mlflow"]) == 0
    text = (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "fronts.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "h100" / "report.md").exists() and (tmp_path / "a100" / "report.md").exists()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == {"`h100`", "`a100`"}
    for name in ("h100", "a100"):
        best = choose(load_study(name, _storage(runs)), None, "throughput")
        cells = [c.strip() for c in rows[f"`{name}`"].split("|")]
        assert cells[3] == f"1 × {name}" and cells[2] == "sim (SIMULATED)"
        assert cells[6] == f"{best.value('output_throughput'):,.0f}"
    assert "**Highest throughput within the SLO:**" in text and "## Recommended command per study" in text


def test_importances_failures_and_pruned_trials_in_the_report(tmp_path):
    """Stored trials written directly (no engine): throughput follows max_num_seqs alone."""
    study = optuna.create_study(study_name="synthetic", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["output_throughput", "ttft_p99"])
    study.set_user_attr("engines", ["vllm"])
    seqs = optuna.distributions.IntDistribution(8, 1024, log=True)
    backend = optuna.distributions.CategoricalDistribution(["auto", "FLASH_ATTN"])

    def summary(throughput: float) -> dict:
        return {"output_throughput": throughput, "p99_ttft_ms": 5000 - throughput}

    study.add_trial(optuna.trial.create_trial(values=[500, 4500], user_attrs={
        "baseline": True, "engine": "vllm", "config": {}, "command": ["vllm", "serve", "m"],
        "summary": summary(500), "constraints": []}))
    for i in range(12):
        n, b = 8 * 2 ** (i % 7), ["auto", "FLASH_ATTN"][i % 2]
        study.add_trial(optuna.trial.create_trial(
            params={"max_num_seqs": n, "attention_backend": b}, distributions={"max_num_seqs": seqs,
                                                                               "attention_backend": backend},
            values=[float(n), 5000.0 - n], user_attrs={"engine": "vllm", "config": {"max_num_seqs": n},
                                                       "command": ["vllm", "serve", "m"], "summary": summary(n),
                                                       "constraints": []}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={
        "engine": "vllm", "failure": "oom_startup", "message": "server exited with code 1 before it was ready",
        "log_tail": "loading\nValueError: No available memory for the cache blocks.\n"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={
        "engine": "vllm", "failure": "constraint", "message": "TP×PP×DP = 4 exceeds the 2 GPUs given"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"engine": "vllm"}))

    report = write_study_report(study, tmp_path / "report")
    assert list(report.importances.values)[0] == "max_num_seqs"
    assert report.importances.values["max_num_seqs"] > 0.8
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| max_num_seqs |" in text and "![parameter importances](importance.png)" in text
    assert "| 13 | vllm | FAIL | oom_startup | server exited with code 1 before it was ready | " \
           "`ValueError: No available memory for the cache blocks.` |" in text
    assert "| 15 | vllm | PRUNED | pruned |" in text
    assert "1 × TP×PP×DP = 4 exceeds the 2 GPUs given" in text
    assert "SIMULATED" not in text  # a real engine's study carries no simulator label
    assert report.metrics["trials_failed"] == 2 and report.metrics["trials_rejected"] == 1
