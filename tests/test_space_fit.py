"""A space that fits the model and the engine's install, and knows which settings change the outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import yaml

from tuner.cli import main
from tuner.engines import get_engine
from tuner.engines.base import Launch
from tuner.errors import InputError
from tuner.models.shapes import get_shape
from tuner.space import fit
from tuner.space.fit import (
    drop_for_study,
    fit_to_model,
    fit_to_weights,
    num_experts,
    output_changes,
    preflight,
    unavailable_in,
)
from tuner.space.knobs import OUTPUT_CHANGING, load_space
from tuner.study.sampling import suggest_config

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


# --- dense vs mixture-of-experts ---------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["vllm", "sglang", "sim"])
def test_a_dense_model_never_gets_an_expert_parallel_proposal(engine):
    space = load_space(engine)
    notes = fit_to_model(space, get_shape("llama-3.1-8b"))
    assert "enable_expert_parallel" not in space.knobs
    assert notes == ["knob 'enable_expert_parallel' dropped: the model is dense (no experts); it applies to "
                     "mixture-of-experts models"] and notes == space.notes
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    configs = [suggest_config(study.ask(), {engine: space})[1] for _ in range(200)]
    assert not any(c.get("enable_expert_parallel") for c in configs)
    moe = load_space(engine)
    assert fit_to_model(moe, get_shape("qwen3-30b-a3b")) == [] and "enable_expert_parallel" in moe.knobs


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_dummy_weights_never_get_a_speculative_proposal(engine):
    space = load_space(engine)
    notes = fit_to_weights(space, dummy=True)
    assert "speculative_method" not in space.knobs and "num_speculative_tokens" not in space.knobs
    assert notes[0].startswith("knob 'speculative_method' dropped: the weights are dummy")
    assert notes[1] == "knob 'num_speculative_tokens' dropped: it depends on dropped 'speculative_method'"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    configs = [suggest_config(study.ask(), {engine: space})[1] for _ in range(100)]
    assert not any(c.get("speculative_method", "none") != "none" for c in configs)
    real = load_space(engine)
    assert fit_to_weights(real, dummy=False) == [] and "speculative_method" in real.knobs


def test_experts_read_from_a_model_folders_config(tmp_path):
    dense, moe, nested = (tmp_path / name for name in ("dense", "moe", "vlm"))
    for folder, config in ((dense, {"model_type": "llama", "num_hidden_layers": 2}),
                           (moe, {"model_type": "mixtral", "num_local_experts": 8}),
                           (nested, {"model_type": "llava", "text_config": {"num_experts": 64}})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    assert [num_experts(p) for p in (dense, moe, nested)] == [0, 8, 64]
    assert num_experts("org/not-downloaded") is None  # unknown: the space is left as it is
    space = load_space("vllm")
    assert fit_to_model(space, "org/not-downloaded") == [] and "enable_expert_parallel" in space.knobs
    assert fit_to_model(space, str(dense)) and "enable_expert_parallel" not in space.knobs


def test_knobs_conditioned_on_a_dropped_moe_knob_go_too(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"engine": "sim", "knobs": {
        "enable_expert_parallel": {"type": "bool", "default": False, "moe_only": True, "flag": "--ep"},
        "expert_balance": {"type": "bool", "default": False, "flag": "--eplb",
                           "when": "enable_expert_parallel == True"},
        "max_num_seqs": {"type": "int", "low": 8, "high": 64, "default": 8, "flag": "--max-num-seqs"}}}))
    space = load_space(str(tmp_path / "s.yaml"))
    notes = fit_to_model(space, {"num_hidden_layers": 2})
    assert list(space.knobs) == ["max_num_seqs"]
    assert notes[1] == "knob 'expert_balance' dropped: it depends on dropped 'enable_expert_parallel'"


# --- library preflight -------------------------------------------------------------------------------

def _space_needing(tmp_path, needs: dict) -> str:
    path = tmp_path / "needs.yaml"
    path.write_text(yaml.safe_dump({"engine": "vllm", "extends": "common.yaml", "knobs": {
        "quantization": {"flag": "--quantization", "omit": ["none"], "needs": needs.get("quantization")},
        "attention_backend": {"flag": "--attention-backend", "choices": ["auto", "FLASHINFER", "TRITON_ATTN"],
                              "omit": ["auto"], "needs": needs.get("attention_backend")},
        "max_num_seqs": {"flag": "--max-num-seqs"}}}, sort_keys=False))
    return str(path)


def test_preflight_drops_the_choices_whose_modules_the_engines_python_cannot_import(tmp_path, monkeypatch):
    space = load_space(_space_needing(tmp_path, {
        "quantization": {"fp8": ["servetune_absent_module"]},
        "attention_backend": {"FLASHINFER": ["json"], "TRITON_ATTN": ["servetune_absent_pkg.sub"]}}))
    calls = []
    real_run = subprocess.run

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(fit.subprocess, "run", counted)
    notes = preflight(space, sys.executable)
    assert len(calls) == 1 and calls[0][0] == sys.executable  # one interpreter run checks every module
    assert notes == [f"quantization=fp8 dropped: {sys.executable} cannot import servetune_absent_module",
                     f"attention_backend=TRITON_ATTN dropped: {sys.executable} cannot import "
                     "servetune_absent_pkg.sub"]
    assert space.knobs["quantization"].fixed and space.knobs["quantization"].fixed_value == "none"
    assert space.knobs["attention_backend"].choices == ("auto", "FLASHINFER")  # json imports


def test_preflight_of_the_shipped_vllm_space_in_an_interpreter_without_vllms_extras(tmp_path):
    space = load_space("vllm")
    missing = {m: not fit.importable(sys.executable, [m])[m] for m in ("compressed_tensors", "flashinfer")}
    notes = preflight(space, sys.executable)
    assert ("fp8" not in space.knobs["quantization"].choices) == missing["compressed_tensors"]
    assert ("FLASHINFER" not in space.knobs["attention_backend"].choices) == missing["flashinfer"]
    assert len(notes) == sum(missing.values())


def test_preflight_with_an_interpreter_that_does_not_run_changes_nothing(tmp_path):
    space = load_space("vllm")
    notes = preflight(space, str(tmp_path / "no-python"))
    assert len(notes) == 1 and notes[0].startswith("library preflight skipped")
    assert space.knobs["quantization"].choices == load_space("vllm").knobs["quantization"].choices
    assert preflight(load_space("sim"), str(tmp_path / "no-python")) == []  # nothing to check: nothing run


def test_an_environment_failure_takes_its_setting_out_of_the_rest_of_the_study():
    space = load_space("vllm")
    config = {**space.defaults(), "quantization": "fp8", "attention_backend": "FLASHINFER"}
    notes = drop_for_study(space, config, "compressed_tensors")
    assert notes == ["quantization=fp8 is not proposed again: the engine's Python cannot import compressed_tensors"]
    assert unavailable_in(space, {**config, "attention_backend": "auto"}) == [
        "quantization=fp8: the engine's Python cannot import compressed_tensors"]
    assert unavailable_in(space, space.defaults()) == []
    assert "fp8" in space.knobs["quantization"].choices  # Optuna's distribution is left as it was
    assert drop_for_study(space, config, "some_other_module") == [] and drop_for_study(space, config, None) == []


@pytest.mark.parametrize("bad, message", [
    ({"quantization": {"fp8": "compressed_tensors"}}, "a mapping of choice to a list of Python modules"),
    ({"quantization": {"int4": ["x"]}}, "'int4' is not one of"),
    ({"quantization": {"fp8": ["no-dashes"]}}, "a mapping of choice to a list of Python modules"),
])
def test_bad_needs_is_one_line_naming_the_knob(tmp_path, bad, message):
    with pytest.raises(InputError, match=message) as err:
        load_space(_space_needing(tmp_path, bad))
    assert "knobs.quantization" in str(err.value)


# --- settings that change the outputs ----------------------------------------------------------------

def test_output_changing_settings_are_named_and_excluded_by_one_flag():
    space = load_space("vllm")
    assert output_changes(space, space.defaults()) == []
    config = {**space.defaults(), "quantization": "fp8", "kv_cache_dtype": "fp8", "speculative_method": "ngram",
              "num_speculative_tokens": 3}
    assert output_changes(space, config) == ["quantization=fp8", "kv_cache_dtype=fp8"]  # n-gram drafts are verified
    assert output_changes(load_space("sglang"), {"kv_cache_dtype": "fp8_e4m3"}) == ["kv_cache_dtype=fp8_e4m3"]
    space.exclude(OUTPUT_CHANGING)
    assert space.knobs["quantization"].fixed_value == "none" and space.knobs["kv_cache_dtype"].fixed_value == "auto"
    assert not space.knobs["speculative_method"].fixed and not space.knobs["max_num_seqs"].fixed
    with pytest.raises(InputError, match=OUTPUT_CHANGING):  # the unknown-knob message lists it
        space.exclude("no_such_knob")


def test_a_list_of_output_changing_values_removes_only_those(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"engine": "sim", "extends": "common.yaml", "knobs": {
        "speculative_method": {"json_flag": "--speculative-config", "json_key": "method",
                               "choices": ["none", "ngram", "lossy_draft"], "changes_outputs": ["lossy_draft"]},
        "max_num_seqs": {"flag": "--max-num-seqs"}}}))
    space = load_space(str(path))
    assert output_changes(space, {"speculative_method": "lossy_draft"}) == ["speculative_method=lossy_draft"]
    space.exclude(OUTPUT_CHANGING)
    assert space.knobs["speculative_method"].choices == ("none", "ngram")


def _study_of(tmp_path, config: dict) -> str:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="out", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["output_throughput", "ttft_p99"])
    command = get_engine("vllm").serve_command(Launch(config=config, model=MODEL), load_space("vllm"))
    study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0], user_attrs={
        "engine": "vllm", "config": config, "command": command,
        "summary": {"output_throughput": 1.0, "p99_ttft_ms": 1.0}, "constraints": []}))
    return storage


@pytest.mark.parametrize("fmt", ["shell", "yaml", "k8s", "docker"])
def test_every_export_of_an_output_changing_configuration_says_so(tmp_path, capsys, fmt):
    space = load_space("vllm")
    storage = _study_of(tmp_path, space.active_config({**space.defaults(), "quantization": "fp8"}))
    assert main(["export", "--study", "out", "--storage", storage, "--format", fmt]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("# servetune: this configuration changes the model's outputs (quantization=fp8); "
                     "tune with --exclude output-changing to keep them")


def test_an_export_that_keeps_the_outputs_has_no_such_line(tmp_path, capsys):
    space = load_space("vllm")
    storage = _study_of(tmp_path, space.defaults())
    assert main(["export", "--study", "out", "--storage", storage]) == 0
    assert "changes the model's outputs" not in capsys.readouterr().out
