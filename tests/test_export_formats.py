"""`tune export --format k8s|docker` (and shell/yaml) from one chosen trial, parsed back to the trial's flags.

The studies here are real Optuna SQLite studies whose trials carry what `tune` records (engine, config,
command from the engine adapter's own `serve_command`, summary); no engine runs."""

from __future__ import annotations

import shlex

import optuna
import pytest
import yaml

from tuner.cli import main
from tuner.engines import engine_names, get_engine
from tuner.engines.base import Launch
from tuner.space.constraints import gpus_needed
from tuner.space.flags import parse_flags
from tuner.space.knobs import load_space

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _config(engine: str, **changes) -> dict:
    space = load_space(engine)
    return space.active_config({**space.defaults(), **changes})


def _ngram(engine: str) -> str:
    return next(c for c in load_space(engine).knobs["speculative_method"].choices if str(c).lower() == "ngram")


def _add_trial(study: optuna.Study, engine: str, config: dict, throughput: float, ttft: float,
               baseline: bool = False, meets_slo: bool = True) -> None:
    launch = Launch(config=config, model=MODEL, baseline=baseline)
    command = get_engine(engine).serve_command(launch, load_space(engine)) + [
        "--load-format", "dummy", "--max-model-len", "4096"]  # a model shape was tuned
    summary = {"output_throughput": throughput, "p99_ttft_ms": ttft, "p99_tpot_ms": 40.0, "goodput": 1.0,
               "slo": "ttft_p99=800ms", "duration_s": 10.0}
    study.add_trial(optuna.trial.create_trial(
        values=[throughput, ttft, 40.0],
        user_attrs={"engine": engine, "config": config, "command": command, "summary": summary,
                    "constraints": [0.0 if meets_slo else 1.0], **({"baseline": True} if baseline else {})}))


def _study(tmp_path, engine: str) -> tuple[str, str, dict[str, dict]]:
    """A stored study of `engine`: the defaults, a fast trial that misses the SLO, a low-latency one, the pick."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = f"deploy-{engine}"
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize", "minimize"])
    for key, value in {"objectives": ["output_throughput", "ttft_p99", "tpot_p99"], "engines": [engine],
                       "model": MODEL, "gpus": 4, "slo": "ttft_p99=800ms",
                       "engine_versions": {engine: "0.9.1"}}.items():
        study.set_user_attr(key, value)
    configs = {
        "defaults": _config(engine),
        "fast": _config(engine, tensor_parallel_size=2, data_parallel_size=2, max_num_seqs=512),
        "low_latency": _config(engine, tensor_parallel_size=2, max_num_seqs=16, enable_prefix_caching=False),
        "pick": _config(engine, tensor_parallel_size=2, data_parallel_size=2, max_num_seqs=128,
                        speculative_method=_ngram(engine), num_speculative_tokens=3, gpu_memory_utilization=0.85),
    }
    _add_trial(study, engine, configs["defaults"], 900.0, 700.0, baseline=True)
    _add_trial(study, engine, configs["fast"], 3000.0, 2500.0, meets_slo=False)
    _add_trial(study, engine, configs["low_latency"], 1000.0, 150.0)
    _add_trial(study, engine, configs["pick"], 2000.0, 600.0)
    return name, storage, configs


def _export(capsys, name: str, storage: str, *extra: str) -> str:
    assert main(["export", "--study", name, "--storage", storage, *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("engine", [n for n in engine_names() if get_engine(n).image])
def test_k8s_manifest_parses_back_to_the_chosen_trial(tmp_path, capsys, engine):
    name, storage, configs = _study(tmp_path, engine)
    docs = list(yaml.safe_load_all(_export(capsys, name, storage, "--format", "k8s")))
    deployment, service = docs
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = get_engine(engine).port
    # the best throughput within the SLO is "pick" (the faster "fast" misses the SLO)
    assert parse_flags(load_space(engine), container["args"]) == configs["pick"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus_needed(configs["pick"]) == 4
    assert container["ports"][0]["containerPort"] == port and service["spec"]["ports"][0]["port"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    if engine == "vllm":
        assert container["image"] == "vllm/vllm-openai:v0.9.1" and "command" not in container
        assert container["args"][:2] == ["--model", MODEL]
    else:
        assert container["image"] == "lmsysorg/sglang:v0.9.1"
        assert container["command"] == ["python3", "-m", "sglang.launch_server"]
        assert container["args"][:4] == ["--model-path", MODEL, "--host", "0.0.0.0"]
    assert container["args"][container["args"].index("--port") + 1] == str(port)
    # the study's extra engine flags travel too
    assert container["args"][-4:] == ["--load-format", "dummy", "--max-model-len", "4096"]


@pytest.mark.parametrize("engine", [n for n in engine_names() if get_engine(n).image])
def test_docker_line_parses_back_to_the_chosen_trial(tmp_path, capsys, engine):
    name, storage, configs = _study(tmp_path, engine)
    words = shlex.split(_export(capsys, name, storage, "--format", "docker", "--image", "registry.local/eng:1"))
    assert words[:2] == ["docker", "run"]
    image_at = words.index("registry.local/eng:1")
    options, args = words[2:image_at], words[image_at + 1:]
    assert options[options.index("--gpus") + 1] == "4"
    port = get_engine(engine).port
    assert options[options.index("-p") + 1] == f"127.0.0.1:{port}:{port}"
    assert "--ipc=host" in options
    assert parse_flags(load_space(engine), args) == configs["pick"]


def test_every_format_comes_from_the_same_trial_chosen_by_slo_and_preference(tmp_path, capsys):
    name, storage, configs = _study(tmp_path, "vllm")
    space = load_space("vllm")
    for prefer, slo, expected in (("throughput", [], "pick"), ("latency", [], "low_latency"),
                                  ("throughput", ["--slo", "ttft_p99=5s"], "fast")):
        extra = ["--prefer", prefer, *slo]
        shell = shlex.split(_export(capsys, name, storage, *extra, "--format", "shell"))
        config_file = yaml.safe_load(_export(capsys, name, storage, *extra, "--format", "yaml"))
        docker = shlex.split(_export(capsys, name, storage, *extra, "--format", "docker"))
        k8s = next(yaml.safe_load_all(_export(capsys, name, storage, *extra, "--format", "k8s")))
        args = k8s["spec"]["template"]["spec"]["containers"][0]["args"]
        assert parse_flags(space, shell) == parse_flags(space, args) == configs[expected], (prefer, slo)
        assert parse_flags(space, docker[docker.index("vllm/vllm-openai:v0.9.1") + 1:]) == configs[expected]
        assert config_file["max-num-seqs"] == configs[expected]["max_num_seqs"]


def test_model_override_and_simulator_refusal(tmp_path, capsys):
    name, storage, _ = _study(tmp_path, "vllm")
    out = _export(capsys, name, storage, "--format", "k8s", "--model", "org/other-model", "--name", "My Server")
    deployment = next(yaml.safe_load_all(out))
    assert deployment["metadata"]["name"] == "my-server"
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--model", "org/other-model"]
    assert "--load-format" not in args and args[-2:] == ["--max-model-len", "4096"]  # real model, real weights

    study = optuna.create_study(study_name="sim-study", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["output_throughput", "ttft_p99"])
    config = _config("sim")
    study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0], user_attrs={
        "engine": "sim", "config": config, "command": ["tune", "sim-serve", "--model-shape", "tiny-llama"],
        "summary": {"output_throughput": 1.0, "p99_ttft_ms": 1.0}, "constraints": []}))
    assert main(["export", "--study", "sim-study", "--storage", storage, "--format", "docker"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no container image" in err
