"""A sweep counts trials stopped on purpose (SLO certainly lost) apart from failed ones."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from tuner.records.objectives import Objectives
from tuner.report.results import load_result
from tuner.sweep.run import cell_result
from tuner.sweep.spec import Cell, WorkloadSpec


def _trial(state: TrialState, **attrs) -> optuna.trial.FrozenTrial:
    values = [1000.0, 200.0, 20.0] if state == TrialState.COMPLETE else None
    return create_trial(state=state, values=values, params={"max_num_seqs": 64},
                        distributions={"max_num_seqs": CategoricalDistribution([64, 128])},
                        user_attrs={"engine": "sim", "config": {"max_num_seqs": 64}, "command": ["tune"], **attrs})


def test_slo_stopped_trials_are_stopped_not_failed(tmp_path):
    study = optuna.create_study(directions=Objectives().directions)
    study.set_user_attr("objectives", list(Objectives().names))
    summary = {"output_throughput": 1000.0, "p99_ttft_ms": 200.0, "p99_tpot_ms": 20.0}
    study.add_trial(_trial(TrialState.COMPLETE, summary=summary, baseline=True))
    study.add_trial(_trial(TrialState.PRUNED, stopped={"kind": "slo"}, message="SLO certainly lost"))
    study.add_trial(_trial(TrialState.PRUNED, stopped={"kind": "slo"}, message="SLO certainly lost"))
    study.add_trial(_trial(TrialState.FAIL, failure="crash", message="exit 1"))
    cell = Cell(model="llama-3.1-8b", shaped=True, workload=WorkloadSpec(path=Path("t.jsonl"), name="t"),
                engine="sim", gpu="h100", gpus=1)
    out = cell_result(cell, load_result(study), tmp_path / "report.md", [])
    assert (out.trials_completed, out.trials_stopped, out.trials_failed) == (1, 2, 1)
