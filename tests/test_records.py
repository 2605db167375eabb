"""The on-disk study format: every committed store (round 1's schema and this one) reads through
TrialRecord/StudyRecord and reports; the record round-trips through Optuna's user attributes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tuner.cli import main
from tuner.outcome import Outcome
from tuner.records.trial import SCHEMA_VERSION, StudyRecord, TrialRecord, records, save

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
STORES = sorted(EXPERIMENTS.glob("*/optuna.db")) + sorted(EXPERIMENTS.glob("*/results*/optuna.db"))


def test_the_committed_stores_are_all_found():
    assert len(STORES) >= 6  # four round-1 GPU runs and the round-2 H200 runs


@pytest.mark.parametrize("store", STORES, ids=lambda p: p.parent.name if not p.parent.name.startswith("results")
                         else f"{p.parent.parent.name}-{p.parent.name}")
def test_every_committed_store_reads_through_the_records_and_reports(store: Path, tmp_path: Path, capsys):
    url = f"sqlite:///{store}"
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    assert names
    for name in names:
        study = optuna.load_study(study_name=name, storage=url)
        study_record = StudyRecord.of(study)
        assert study_record.objectives and study_record.engines
        trials = records(study)
        assert len(trials) == len(study.trials)
        done = [r for r in trials if r.completed]
        assert done and all(r.engine and r.config and r.command for r in done)
        assert any(r.baseline for r in trials)
        assert main(["report", name, "--storage", url, "--out", str(tmp_path / name), "--no-mlflow"]) == 0
        assert (tmp_path / name / name / "report.md").exists() or (tmp_path / name / "report.md").exists()
    assert "recommended" in capsys.readouterr().out


def test_a_record_round_trips_and_only_known_fields_are_written(tmp_path: Path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    trial = study.ask()
    save(trial, engine="sim", config={"max_num_seqs": 8}, baseline=True, failure=Outcome.OOM_STARTUP,
         constraints=[1.5, -2.0], unreliable=["client send lag p99 9.0 ms > 5 ms"])
    with pytest.raises(AttributeError, match="no field 'nonsense'"):
        save(trial, nonsense=1)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    stored = study.trials[0].user_attrs
    assert stored["failure"] == "oom_startup" and type(stored["failure"]) is str  # plain JSON for old readers
    record = TrialRecord.from_trial(study.trials[0])
    assert record.state == "FAIL" and record.config == {"max_num_seqs": 8} and record.baseline
    assert not record.meets_slo and record.to_attrs() == stored


def test_a_study_record_is_written_with_the_schema_version(tmp_path: Path):
    from tuner.study.session import StudySession

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert StudyRecord.of(study).schema_version == 1  # what a round-1 store reads as
    StudySession(study).save_study(objectives=["goodput"], offered_rate=2.5)
    again = StudyRecord.of(optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'o.db'}"))
    assert again.schema_version == SCHEMA_VERSION and again.objectives == ["goodput"] and again.offered_rate == 2.5


def test_a_goodput_studys_report_names_its_objective_and_units(tmp_path: Path):
    store = EXPERIMENTS / "h200-goodput" / "results-r2" / "optuna.db"
    url = f"sqlite:///{store}"
    assert main(["report", "h200-goodput-r2", "--storage", url, "--out", str(tmp_path), "--no-mlflow"]) == 0
    report = next(tmp_path.rglob("report.md")).read_text()
    assert "| objectives | goodput (max) |" in report
    assert "| goodput (req/s) | 5.1 | 35.9 | ×7.05 |" in report and "goodput (ms)" not in report


def test_a_report_shows_each_server_s_start_up_phases_and_the_gpu_time_measuring(tmp_path: Path):
    from tuner.report.write import write_study_report

    store = EXPERIMENTS / "h200-goodput" / "results-r5" / "optuna.db"  # three vLLM servers on the H200, round 5
    study = optuna.load_study(study_name="r5-with-rows0", storage=f"sqlite:///{store}")
    (tmp_path / "campaign.json").write_text('{"gpus": 1, "held_gpu_s": 600.0, "measuring_gpu_s": 90.0, '
                                            '"utilisation": 0.15, "spans": []}')
    written = write_study_report(study, tmp_path / "out", run_dir=tmp_path)
    assert written.metrics["ready_median_s"] == 89.82 and written.metrics["measuring_over_held"] == 0.15  # MLflow
    report = written.files[0].read_text()
    section = report.split("## Start-up and GPU time")[1].split("\n## ")[0]
    assert "**median 89.8 s** over 3 server(s), 64.5-94.3 s" in section
    header = next(line for line in section.splitlines() if line.startswith("| trial"))
    assert header.split("|")[4:6] == [" import ", " model_load "] and " torch_compile " in header
    assert "| 1 | vllm | yes | 0.0 | 3.2 | 56.8 | 23.5 |" in section  # trial 1 as its record holds it
    assert "| median |  |  | 0.0 | 3.2 | 55.3 | 23.5 | 5.0 | 2.5 | 3.3 | 89.8 |" in section
    assert "measuring / held **0.15** (90 of 600 GPU-s held on 1 GPU(s)" in section
    (tmp_path / "campaign.json").unlink()
    again = write_study_report(study, tmp_path / "again", run_dir=tmp_path).files[0].read_text()
    assert "measuring / held" not in again and "**median 89.8 s**" in again
