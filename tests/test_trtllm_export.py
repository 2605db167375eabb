"""TensorRT-LLM (`trtllm-serve`): flags, the LLM-API options file of `option:` knobs, and export.

No TensorRT-LLM runs here (none is installed on any machine this was written on); the studies are real
Optuna SQLite studies whose trials carry what `tune` records, as in test_export_formats.py."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tuner.cli import main
from tuner.engines import get_engine
from tuner.engines.base import Launch
from tuner.errors import InputError
from tuner.outcome import Outcome
from tuner.space.flags import parse_flags, render_flags, render_options
from tuner.space.knobs import load_space

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
OPTIONS = "extra-llm-api-options.yaml"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _config(**changes) -> dict:
    space = load_space("trtllm")
    return space.active_config({**space.defaults(), **changes})


PICK = dict(tensor_parallel_size=2, enable_expert_parallel=True, max_num_seqs=256, max_num_batched_tokens=4096,
            enable_chunked_prefill=True, kv_cache_dtype="fp8", enable_prefix_caching=False,
            gpu_memory_utilization=0.85, cuda_graph_max_batch_size=64, cuda_graph_padding=True,
            attention_backend="FLASHINFER", speculative_method="NGram", num_speculative_tokens=3)
PICK_OPTIONS = {
    "attn_backend": "FLASHINFER",
    "kv_cache_config": {"dtype": "fp8", "enable_block_reuse": False, "free_gpu_memory_fraction": 0.85},
    "speculative_config": {"decoding_type": "NGram", "max_draft_len": 3},
    "cuda_graph_config": {"max_batch_size": 64, "enable_padding": True},
}
PICK_FLAGS = ["--tp_size", "2", "--pp_size", "1", "--ep_size", "2", "--max_batch_size", "256",
              "--max_num_tokens", "4096", "--enable_chunked_prefill"]


def test_a_config_renders_exact_flags_and_options_file(cache_dir):
    space, engine = load_space("trtllm"), get_engine("trtllm")
    launch = Launch(config=_config(**PICK), model=MODEL, port=8123)
    assert engine.serve_command(launch, space) == [
        "trtllm-serve", MODEL, "--backend", "pytorch", *PICK_FLAGS, "--extra_llm_api_options", OPTIONS]
    options = engine.options_file(launch, space)
    assert (options.flag, options.name) == ("--extra_llm_api_options", OPTIONS)
    assert yaml.safe_load(options.text) == PICK_OPTIONS

    spec = engine.server_spec(launch, space)
    assert spec.argv[:5] == [sys.executable, "-m", "tensorrt_llm.commands.serve", "serve", MODEL]
    assert spec.argv[5:11] == ["--backend", "pytorch", "--host", "127.0.0.1", "--port", "8123"]
    assert "--served-model-name" not in spec.argv and spec.served_model_name == MODEL
    written = Path(spec.argv[spec.argv.index("--extra_llm_api_options") + 1])
    assert written.parent == cache_dir / "options" and written.read_text() == options.text
    assert spec.argv[11:-2] == PICK_FLAGS
    # the options-file knobs are not flags
    assert parse_flags(space, spec.argv) == {k: v for k, v in _config(**PICK).items()
                                             if space.knobs[k].flag is not None}


def test_kv_cache_fp8_block_reuse_off_and_cuda_graph_batch_go_to_the_options_file():
    space = load_space("trtllm")
    config = _config(kv_cache_dtype="fp8", enable_prefix_caching=False, cuda_graph_max_batch_size=32)
    assert render_options(space, config, baseline=True) == {
        "kv_cache_config": {"dtype": "fp8", "enable_block_reuse": False},
        "cuda_graph_config": {"max_batch_size": 32}}
    assert render_flags(space, config, baseline=True) == []
    # a tuned trial sets every option it has, the engine's defaults included; `auto` dtype is left out
    assert render_options(space, _config()) == {
        "attn_backend": "TRTLLM",
        "kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.9},
        "cuda_graph_config": {"max_batch_size": 128, "enable_padding": False}}


def test_cuda_graphs_off_is_a_null_section_and_its_sub_knobs_drop_out():
    space = load_space("trtllm")
    config = _config(cuda_graphs=False, cuda_graph_max_batch_size=64)
    assert "cuda_graph_max_batch_size" not in config and "cuda_graph_padding" not in config
    options = render_options(space, config, baseline=True)
    assert options == {"cuda_graph_config": None}
    text = get_engine("trtllm").options_file(Launch(config=config, model=MODEL, baseline=True), space).text
    assert text == "cuda_graph_config: null\n"


def test_defaults_trial_renders_no_tuned_flag_and_no_options_file():
    space, engine = load_space("trtllm"), get_engine("trtllm")
    launch = Launch(config=space.defaults(), model=MODEL, baseline=True)
    assert "num_speculative_tokens" not in space.defaults()
    assert engine.options_file(launch, space) is None
    assert engine.serve_command(launch, space) == ["trtllm-serve", MODEL, "--backend", "pytorch"]
    assert "--extra_llm_api_options" not in engine.server_spec(launch, space).argv


def test_option_fields_are_checked_when_the_space_loads(tmp_path):
    def load(knob: str) -> None:
        path = tmp_path / "space.yaml"
        path.write_text(f"engine: trtllm\nextends: common.yaml\nknobs:\n  {knob}\n")
        load_space(str(path))

    with pytest.raises(InputError, match="flags or to an option"):
        load("kv_cache_dtype: {flag: --kv-cache-dtype, option: kv_cache_config.dtype}")
    with pytest.raises(InputError, match="dotted path"):
        load("kv_cache_dtype: {option: kv_cache_config.}")
    with pytest.raises(InputError, match="for bool knobs"):
        load("max_num_seqs: {option_off: scheduler}")


def test_a_section_set_to_null_keeps_nothing_under_it_in_either_order(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("engine: trtllm\nextends: common.yaml\nknobs:\n"
                    "  max_num_seqs: {option: cuda_graph_config.max_batch_size}\n"
                    "  cuda_graphs: {option_off: cuda_graph_config}\n")
    space = load_space(str(path))
    assert render_options(space, {"max_num_seqs": 64, "cuda_graphs": False}) == {"cuda_graph_config": None}
    space.knobs = dict(reversed(space.knobs.items()))
    assert render_options(space, {"max_num_seqs": 64, "cuda_graphs": False}) == {"cuda_graph_config": None}


def test_an_engine_without_an_options_file_refuses_option_knobs(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("engine: vllm\nextends: common.yaml\nknobs:\n  kv_cache_dtype: {option: kv_cache_config.dtype}\n")
    space = load_space(str(path))
    with pytest.raises(InputError, match="reads no options file"):
        get_engine("vllm").serve_command(Launch(config={"kv_cache_dtype": "fp8"}, model=MODEL), space)


def test_local_model_folder_is_served_under_its_folder_name(tmp_path):
    folder = tmp_path / "llama-8b"
    folder.mkdir()
    spec = get_engine("trtllm").server_spec(Launch(config=_config(), model=str(folder)), load_space("trtllm"))
    assert spec.served_model_name == "llama-8b"


@pytest.mark.parametrize("log, expected", [
    ("[E] Failed to initialize executor on rank 1: Executor creation failed due to insufficient GPU memory.",
     Outcome.OOM_STARTUP),
    ("[TensorRT-LLM][ERROR] CUDA runtime error in ::cudaMallocAsync(ptr, n, stream): out of memory",
     Outcome.OOM_STARTUP),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", Outcome.OOM_LOAD),
    ("Error: No such option: --max-model-len", Outcome.INVALID_CONFIG),
    ("pydantic_core._pydantic_core.ValidationError: 1 validation error for KvCacheConfig", Outcome.INVALID_CONFIG),
    ("Segmentation fault (core dumped)", Outcome.CRASH),
])
def test_failures_classified(log, expected):
    assert get_engine("trtllm").classify_failure(1, log) == expected


def test_version_is_the_last_line_after_the_import_banner(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho '[TensorRT-LLM] TensorRT-LLM version: 1.2.0'\necho 1.2.0\n")
    fake_python.chmod(0o755)
    assert get_engine("trtllm").version(str(fake_python)) == "1.2.0"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_a_study_refuses_trtllm_where_it_is_not_installed():
    from tuner.study.tune import TuneOptions, Tuner

    options = TuneOptions(workload=Path("unused.jsonl"), requests=[], workload_digest="", engines=["trtllm"],
                          model=MODEL, shape=None, gpus=1, gpu="h100")
    with pytest.raises(InputError, match="trtllm is not importable"):
        Tuner(options)


# --- export round trip ---------------------------------------------------------------------------

def _add_trial(study: optuna.Study, config: dict, throughput: float, baseline: bool = False,
               command: list[str] | None = None) -> None:
    launch = Launch(config=config, model=MODEL, baseline=baseline)
    command = command or get_engine("trtllm").serve_command(launch, load_space("trtllm"))
    summary = {"output_throughput": throughput, "p99_ttft_ms": 500.0, "p99_tpot_ms": 40.0, "goodput": 1.0,
               "slo": "ttft_p99=800ms", "duration_s": 10.0}
    study.add_trial(optuna.trial.create_trial(
        values=[throughput, 500.0, 40.0],
        user_attrs={"engine": "trtllm", "config": config, "command": command, "summary": summary,
                    "constraints": [0.0], **({"baseline": True} if baseline else {})}))


def _study(tmp_path) -> tuple[str, str, optuna.Study]:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="trtllm-study", storage=storage,
                                directions=["maximize", "minimize", "minimize"])
    for key, value in {"objectives": ["output_throughput", "ttft_p99", "tpot_p99"], "engines": ["trtllm"],
                       "model": MODEL, "gpus": 2, "slo": "ttft_p99=800ms",
                       "spaces": {"trtllm": str(load_space("trtllm").source)}}.items():
        study.set_user_attr(key, value)
    return "trtllm-study", storage, study


def _export(capsys, name: str, storage: str, *extra: str) -> str:
    assert main(["export", "--study", name, "--storage", storage, *extra]) == 0
    return capsys.readouterr().out


def test_export_shell_writes_the_options_file_then_runs_the_command(tmp_path, capsys):
    name, storage, study = _study(tmp_path)
    _add_trial(study, _config(), 900.0, baseline=True)
    _add_trial(study, _config(**PICK), 2000.0)
    note, out = _export(capsys, name, storage, "--format", "shell").split("\n", 1)
    assert note.startswith("# servetune: this configuration changes the model's outputs (kv_cache_dtype=fp8)")
    head, rest = out.split("\n", 1)
    assert head == f"cat > {OPTIONS} <<'EOF'"
    body, command = rest.split("EOF\n", 1)
    assert yaml.safe_load(body) == PICK_OPTIONS
    assert shlex.split(command) == ["trtllm-serve", MODEL, "--backend", "pytorch", *PICK_FLAGS,
                                    "--extra_llm_api_options", OPTIONS]

    # the same script, run by a shell, leaves that file behind (trtllm-serve itself is stubbed out)
    import subprocess

    script = out.replace("trtllm-serve ", "true ", 1)
    subprocess.run(["sh", "-c", script], cwd=tmp_path, check=True)
    assert yaml.safe_load((tmp_path / OPTIONS).read_text()) == PICK_OPTIONS

    config_file = _export(capsys, name, storage, "--format", "yaml")
    assert config_file.split("\n", 1)[0] == note
    header, _, text = config_file.split("\n", 1)[1].partition("\n")
    assert yaml.safe_load(text) == PICK_OPTIONS
    assert shlex.split(header.split("use as: ", 1)[1]) == [
        "trtllm-serve", MODEL, "--backend", "pytorch", *PICK_FLAGS, "--extra_llm_api_options", "THIS_FILE"]


def test_export_of_the_defaults_trial_is_the_bare_command(tmp_path, capsys):
    name, storage, study = _study(tmp_path)
    _add_trial(study, _config(), 900.0, baseline=True)
    assert shlex.split(_export(capsys, name, storage)) == ["trtllm-serve", MODEL, "--backend", "pytorch"]
    config_file = _export(capsys, name, storage, "--format", "yaml")
    assert config_file.splitlines()[0].endswith("--extra_llm_api_options THIS_FILE")
    assert yaml.safe_load(config_file) == {}


@pytest.mark.parametrize("fmt", ["k8s", "docker"])
def test_container_formats_refuse_trtllm_in_one_line(tmp_path, capsys, fmt):
    name, storage, study = _study(tmp_path)
    _add_trial(study, _config(**PICK), 2000.0)
    assert main(["export", "--study", name, "--storage", storage, "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'trtllm'" in err and "no container image" in err


def test_export_refuses_an_options_file_the_space_no_longer_gives(tmp_path, capsys):
    name, storage, study = _study(tmp_path)
    bare = ["trtllm-serve", MODEL, "--backend", "pytorch", *PICK_FLAGS]  # recorded without the file
    _add_trial(study, _config(**PICK), 2000.0, command=bare)
    assert main(["export", "--study", name, "--storage", storage]) == 2
    assert "cannot be rebuilt" in capsys.readouterr().err
