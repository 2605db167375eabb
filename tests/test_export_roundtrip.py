"""Exports that work: a simulator study's YAML serves through `tune sim-serve --config`, and container
exports leave out the tuning machine's own engine args (with a note) and write no YAML anchors."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.request

import optuna
import yaml

from tuner.cli import main
from tuner.engines import get_engine
from tuner.engines.base import Launch
from tuner.runner.server import free_port
from tuner.space.knobs import load_space

MACHINE_ARGS = ["--enforce-eager", "--kv-cache-memory-bytes", "2000000000", "--distributed-executor-backend", "uni"]


def _study(tmp_path, engine: str, model: str, config: dict, extra: list[str], attrs: dict) -> tuple[str, str]:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=engine, storage=storage, directions=["maximize", "minimize", "minimize"])
    for key, value in {"objectives": ["output_throughput", "ttft_p99", "tpot_p99"], "engines": [engine],
                       "model": model, "gpus": 2, **attrs}.items():
        study.set_user_attr(key, value)
    launch = Launch(config=config, model=model, time_scale=10.0, max_model_len=4096, extra_args=tuple(extra))
    command = get_engine(engine).serve_command(launch, load_space(engine))
    summary = {"output_throughput": 1000.0, "p99_ttft_ms": 100.0, "p99_tpot_ms": 20.0, "duration_s": 5.0}
    study.add_trial(optuna.trial.create_trial(values=[1000.0, 100.0, 20.0], user_attrs={
        "engine": engine, "config": config, "command": command, "summary": summary, "constraints": []}))
    return engine, storage


def test_simulator_yaml_export_serves_the_trial_through_sim_serve_config(tmp_path, capsys):
    space = load_space("sim")
    config = space.active_config({**space.defaults(), "max_num_seqs": 24, "enable_prefix_caching": False,
                                  "max_num_batched_tokens": 4096})
    name, storage = _study(tmp_path, "sim", "llama-3.1-8b", config, [], {})
    assert main(["export", "--study", name, "--storage", storage, "--format", "yaml"]) == 0
    text = capsys.readouterr().out
    use_as = text.splitlines()[0].split("use as: ", 1)[1]
    assert use_as == "tune sim-serve --config THIS_FILE"
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    port = free_port()
    argv = [sys.executable, "-m", "tuner", *shlex.split(use_as.replace("THIS_FILE", str(path)))[1:],
            "--port", str(port), "--startup-seconds", "0"]  # flags after the file win over it
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, info = time.monotonic() + 60, None
        while info is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/info", timeout=2) as response:
                    info = json.load(response)["config"]
            except OSError:
                time.sleep(0.2)
        assert info is not None, server.stderr.read() if server.poll() is not None else "not ready in 60 s"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (info["max_num_seqs"], info["enable_prefix_caching"], info["max_num_batched_tokens"]) == (24, False, 4096)
    assert (info["time_scale"], info["max_model_len"], info["port"]) == (10.0, 4096, port)


def test_sim_serve_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    assert main(["sim-serve", "--config", str(bad)]) == 2
    assert "bad.yaml: must be a mapping" in capsys.readouterr().err
    assert main(["sim-serve", "--config"]) == 2
    assert "--config" in capsys.readouterr().err


def test_container_exports_drop_machine_specific_args_with_a_note_and_no_anchors(tmp_path, capsys):
    space = load_space("vllm")
    config = space.active_config({**space.defaults(), "max_num_seqs": 64})
    name, storage = _study(tmp_path, "vllm", "meta-llama/Llama-3.1-8B-Instruct", config, MACHINE_ARGS,
                           {"engine_args": MACHINE_ARGS})
    assert main(["export", "--study", name, "--storage", storage, "--format", "k8s"]) == 0
    out = capsys.readouterr()
    assert "&id" not in out.out and "*id" not in out.out
    args = next(yaml.safe_load_all(out.out))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not set(args) & {"--enforce-eager", "--kv-cache-memory-bytes", "--distributed-executor-backend"}
    assert "--max-num-seqs" in args
    assert "--enforce-eager --kv-cache-memory-bytes 2000000000 --distributed-executor-backend uni" in out.err
    assert main(["export", "--study", name, "--storage", storage, "--format", "docker"]) == 0
    out = capsys.readouterr()
    assert "--kv-cache-memory-bytes" not in out.out and "left out engine args" in out.err


def test_a_tuned_enforce_eager_stays_when_the_study_did_not_store_its_engine_args(tmp_path, capsys):
    space = load_space("vllm")
    config = space.active_config({**space.defaults(), "cuda_graphs": False})  # the knob renders --enforce-eager
    name, storage = _study(tmp_path, "vllm", "meta-llama/Llama-3.1-8B-Instruct", config,
                           ["--kv-cache-memory-bytes", "2000000000"], {})
    assert main(["export", "--study", name, "--storage", storage, "--format", "docker"]) == 0
    out = capsys.readouterr()
    assert "--enforce-eager" in out.out and "--kv-cache-memory-bytes" not in out.out


def test_exports_drop_the_machine_args_given_to_one_engine_of_the_study(tmp_path, capsys):
    space = load_space("vllm")
    config = space.active_config({**space.defaults(), "max_num_seqs": 64})
    name, storage = _study(tmp_path, "vllm", "meta-llama/Llama-3.1-8B-Instruct", config, MACHINE_ARGS,
                           {"engine_args": [], "engine_args_by_engine": {"vllm": MACHINE_ARGS, "sglang": []}})
    assert main(["export", "--study", name, "--storage", storage, "--format", "docker"]) == 0
    out = capsys.readouterr()
    # --enforce-eager too: known as the study's own arg, not taken for the cuda_graphs knob's
    assert "--enforce-eager" not in out.out and "--kv-cache-memory-bytes" not in out.out and "--max-num-seqs" in out.out
    assert "left out engine args" in out.err
