"""The built wheel tunes: search spaces ship as package data, and a one-trial simulator study runs from a
directory that is not the source tree, with MLflow's artifacts kept under servetune-runs/."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "workloads" / "mooncake_conversation_head300.jsonl"

pytestmark = pytest.mark.slow


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv[:4]} exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_installs_and_tunes_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)], tmp_path, env, 300)
    (wheel,) = dist.glob("servetune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"tuner/search_spaces/common.yaml", "tuner/search_spaces/vllm.yaml", "tuner/search_spaces/sim.yaml",
            "tuner/search_spaces/sglang.yaml", "tuner/search_spaces/trtllm.yaml"} <= set(names)

    venv = tmp_path / "venv"
    # no pip of its own (ensurepip: about 6 s); this interpreter's pip installs into it
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env, 120)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env, 120)
    # the dependencies come from this interpreter's site-packages, appended after the venv's own (a .pth line
    # is a path only: the editable install's hooks there are not run, so `tuner` is the wheel's)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env, 60).stdout.strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_outer_site.pth").write_text("\n".join(sorted(outer)) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import tuner; print(tuner.__file__)"], elsewhere, env, 60).stdout
    assert where.startswith(str(venv)), where
    done = _run([str(venv / "bin" / "tune"), "--workload", str(TRACE), "--rows", "20", "--engine", "sim",
                 "--gpus", "1", "--trials", "1", "--sim-time-scale", "10", "--engine-arg=--startup-seconds 1",
                 "--study-name", "wheel"], elsewhere, env, 400)
    assert "tune sim-serve" in done.stdout, done.stdout[-2000:]
    assert "Token authentication is enabled" not in done.stdout + done.stderr  # Ray's banner is silenced
    runs = elsewhere / "servetune-runs"
    study = optuna.load_study(study_name="wheel", storage=f"sqlite:///{runs / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert not (elsewhere / "mlruns").exists()  # MLflow's artifacts went beside its store
    assert any((runs / "mlartifacts").rglob("*.log"))
