"""Engine adapters: argv from one config, failure classes from real vLLM logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuner.engines import engine_names, get_engine
from tuner.engines.base import Launch, remove_key_file
from tuner.errors import InputError
from tuner.outcome import Outcome, missing_module
from tuner.space.flags import parse_flags
from tuner.space.knobs import load_space

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


@pytest.mark.parametrize("name, expected", [
    ("fail-invalid-config-batched-tokens.log", Outcome.INVALID_CONFIG),
    ("fail-kv-too-small.log", Outcome.OOM_STARTUP),
    ("fail-kv-exceeds-memory.log", Outcome.OOM_STARTUP),
    ("fail-oom-weights.log", Outcome.OOM_STARTUP),
    ("fail-unsupported-backend.log", Outcome.UNSUPPORTED),
    ("fail-bad-flag.log", Outcome.INVALID_CONFIG),
    ("fail-max-model-len-too-long.log", Outcome.INVALID_CONFIG),
    ("fail-unsupported-flex-fp8-h100.log", Outcome.UNSUPPORTED),  # vLLM 0.26.0 on the H100
])
def test_vllm_failures_classified_from_real_logs(name, expected):
    log = (FIXTURES / name).read_text()
    assert get_engine("vllm").classify_failure(1, log) == expected


@pytest.mark.parametrize("name", ["fail-bad-flag.log", "fail-invalid-choice.log"])
def test_sglang_failures_classified_from_real_logs(name):
    # SGLang 0.5.17's own argument errors (the end of its log), captured from `python -m sglang.launch_server`
    log = (FIXTURES.parent / "sglang" / name).read_text()
    assert get_engine("sglang").classify_failure(2, log) == Outcome.INVALID_CONFIG


def test_a_healthy_sglang_start_on_the_h100_matches_no_failure_pattern():
    # the start of trial 0 in experiments/h100-sglang (warnings about missing optional modules included)
    log = (FIXTURES.parent / "sglang" / "ok-h100-startup.log").read_text()
    assert "max_total_num_tokens=410636" in log
    assert get_engine("sglang").classify_failure(None, log) == Outcome.CRASH  # the fallback: nothing known


def test_healthy_log_with_a_backend_warning_is_not_a_known_failure():
    log = (FIXTURES / "ok-backend-ignored-on-cpu.log").read_text()
    assert get_engine("vllm").classify_failure(None, log) == Outcome.CRASH


def test_vllm_metrics_parsed_from_real_scrape():
    metrics = get_engine("vllm").engine_metrics((FIXTURES / "metrics-sample.txt").read_text())
    assert metrics["generation_tokens_total"] > 0
    assert "num_preemptions_total" in metrics and "kv_cache_usage_perc" in metrics
    assert not any(name.endswith("_bucket") for name in metrics)


@pytest.mark.parametrize("engine", engine_names())
def test_one_config_gives_each_engine_its_argv_and_parses_back(engine):
    space = load_space(engine)
    config = dict(space.defaults(), max_num_seqs=48, enable_prefix_caching=False, tensor_parallel_size=2)
    adapter = get_engine(engine)
    model = "llama-3.1-8b" if adapter.simulated else "/models/llama"
    launch = Launch(config=config, model=model, port=8123, api_key="sekret", time_scale=5)
    spec = adapter.server_spec(launch, space)
    assert spec.url == "http://127.0.0.1:8123"
    assert spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"
    command = adapter.serve_command(launch, space)
    assert command[:len(adapter.display_program())] == adapter.display_program()
    assert "8123" not in command and "sekret" not in command  # tuner-internal port and key stay out
    in_file = {n for n, k in space.knobs.items() if k.option or k.option_off}  # the options file, not argv
    flags = {k: v for k, v in parse_flags(space, command).items() if k not in in_file}
    assert flags == {k: v for k, v in space.active_config(config).items() if k not in in_file}
    assert spec.clock_scale == (5 if adapter.simulated else 1)
    if engine == "vllm":  # not in VLLM_API_KEY either: vLLM 0.26 hashes it into the compile-cache key
        assert command[:3] == ["vllm", "serve", "/models/llama"]
        assert "VLLM_API_KEY" not in spec.env
    if engine == "sglang":
        assert command[:4] == ["python", "-m", "sglang.launch_server", "--model-path"]
    if engine in ("vllm", "sglang"):
        key_path = Path(spec.argv[spec.argv.index("--config") + 1])
        assert yaml.safe_load(key_path.read_text()) == {"api-key": "sekret"} and "sekret" not in spec.argv
        assert key_path.stat().st_mode & 0o777 == 0o600
        remove_key_file("sekret")
        assert not key_path.exists()
    if engine == "sim":
        assert spec.env["SERVETUNE_API_KEY"] == "sekret" and "sekret" not in spec.argv


def test_unknown_engine_and_shape_are_input_errors():
    with pytest.raises(InputError):
        get_engine("tensorrt")
    with pytest.raises(InputError, match="unknown model shape"):
        get_engine("sim").server_spec(Launch(config={}, model="gpt-9"), load_space("sim"))


def test_knobs_missing_from_the_installed_version_are_dropped_with_a_note():
    from tuner.engines.probe import drop_unsupported, flags_in

    help_text = (FIXTURES / "vllm-0.32.0-cpu-serve-help.txt").read_text()
    available = flags_in(help_text)
    assert {"--max-num-seqs", "--no-enable-prefix-caching", "--speculative-config"} <= available
    space = load_space("vllm")
    assert drop_unsupported(space, available) == []
    older = available - {"--attention-backend", "--speculative-config"}
    space = load_space("vllm")
    notes = drop_unsupported(space, older)
    assert "attention_backend" not in space.knobs and "speculative_method" not in space.knobs
    assert "num_speculative_tokens" not in space.knobs  # conditioned on a dropped knob
    assert any("--attention-backend" in note for note in notes)
    assert "max_num_seqs" in space.knobs


PINNED_HELP = {  # the --help text of the versions we run: GPU machines, CI's CPU build, the newest SGLang read
    "vllm-0.26.0": ("vllm", FIXTURES / "vllm-0.26.0-serve-help.txt"),
    "vllm-0.32.0-cpu": ("vllm", FIXTURES / "vllm-0.32.0-cpu-serve-help.txt"),
    "sglang-0.5.17": ("sglang", FIXTURES.parent / "sglang" / "sglang-0.5.17-launch-server-help.txt"),
    "sglang-0.5.23": ("sglang", FIXTURES.parent / "sglang" / "sglang-0.5.23-flags.txt"),
}
EVERY_KNOB_SET = {  # every knob away from its default where the engine's space has it
    "max_num_seqs": 64, "max_num_batched_tokens": 4096, "enable_prefix_caching": False, "cuda_graphs": False,
    "speculative_method": "ngram", "num_speculative_tokens": 4, "tensor_parallel_size": 2,
    "enable_chunked_prefill": False, "gpu_memory_utilization": 0.8, "quantization": "fp8",
}


@pytest.mark.parametrize("version", sorted(PINNED_HELP))
def test_every_flag_of_one_config_exists_in_the_pinned_versions_help(version):
    from tuner.engines.probe import drop_unsupported, flags_in

    engine, help_file = PINNED_HELP[version]
    available = flags_in(help_file.read_text())
    space = load_space(engine)
    notes = drop_unsupported(space, available)
    config = dict(space.defaults())
    for name, value in EVERY_KNOB_SET.items():
        knob = space.knobs.get(name)
        if knob is not None:
            choices = {str(c).lower(): c for c in knob.choices or ()}
            config[name] = choices.get(str(value).lower(), value) if choices else value
    for name, value in (("kv_cache_dtype", "fp8"), ("attention_backend", "TRITON")):
        knob = space.knobs.get(name)
        if knob is not None:
            config[name] = next(c for c in knob.choices if str(c).upper().startswith(value.upper()))
    launch = Launch(config=config, model="/models/llama", max_model_len=8192, dummy_weights=True)
    argv = get_engine(engine).server_spec(launch, space).argv
    used = {a for a in argv if a.startswith("--")}
    assert used <= available, used - available
    assert {"--load-format"} <= used and ("--context-length" if engine == "sglang" else "--max-model-len") in used
    assert notes == []  # every knob of the space exists in every pinned version


def test_engine_metrics_derive_spec_decode_acceptance_from_a_real_scrape():
    # vLLM (CPU build) with n-gram drafting, 4 requests on a prompt that repeats itself
    metrics = get_engine("vllm").engine_metrics((FIXTURES / "metrics-spec-decode-ngram.txt").read_text())
    assert metrics["spec_decode_num_draft_tokens_total"] == 152
    assert metrics["spec_decode_num_accepted_tokens_total"] == 140
    assert metrics["spec_decode_acceptance_rate"] == pytest.approx(140 / 152)
    assert metrics["spec_decode_mean_accepted_length"] == pytest.approx(1 + 140 / 52)
    assert metrics["prefix_cache_hit_rate"] == 0.0  # 80 queries, no hit
    # SGLang 0.5.17 on the H100 (experiments/h100-sglang, trial 0): radix cache on, no drafting
    sglang = get_engine("sglang").engine_metrics(
        'sglang:prompt_tokens_total{model_name="m"} 520366.0\nsglang:cached_tokens_total{model_name="m"} 18944.0\n'
        'sglang:cache_hit_rate{model_name="m"} 0.0\nsglang:spec_accept_length{model_name="m"} 0.0\n'
        'sglang:spec_accept_rate{model_name="m"} 0.0\n')
    assert sglang["prefix_cache_hit_rate"] == pytest.approx(18944 / 520366)
    assert "spec_decode_acceptance_rate" not in sglang  # nothing was drafted: no rate to report
    drafting = get_engine("sglang").engine_metrics(
        'sglang:spec_accept_length{model_name="m"} 2.5\nsglang:spec_accept_rate{model_name="m"} 0.4\n')
    assert drafting["spec_decode_mean_accepted_length"] == 2.5 and drafting["spec_decode_acceptance_rate"] == 0.4


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_missing_module_at_start_is_an_environment_failure_naming_the_module(engine):
    # vLLM 0.26.0 with --quantization fp8 on an install without compressed_tensors (issue #14's H200 run)
    log = (FIXTURES / "fail-missing-module-fp8.log").read_text()
    assert get_engine(engine).classify_failure(1, log) == Outcome.ENVIRONMENT == "environment"
    assert missing_module(log) == "compressed_tensors"
    raw = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
           "ImportError: cannot import name 'f' from 'flashinfer.x'")
    assert get_engine(engine).classify_failure(1, raw) == Outcome.ENVIRONMENT and missing_module(raw) == "flashinfer.x"


def test_warnings_that_quote_an_import_error_are_not_environment_failures():
    # SGLang 0.5.17 on the H100 logs two optional modules it could not import, then starts fine
    log = (FIXTURES.parent / "sglang" / "ok-h100-startup.log").read_text()
    assert "No module named 'openai_harmony'" in log
    assert get_engine("sglang").classify_failure(None, log) == Outcome.CRASH


def test_outcomes_are_plain_strings_in_a_store():
    assert json.loads(json.dumps({"failure": Outcome.SLO_LOST})) == {"failure": "slo_lost"}
    assert f"{Outcome.OOM_LOAD}" == str(Outcome.OOM_LOAD) == "oom_under_load"
    assert Outcome("predicted_infeasible") is Outcome.PREDICTED_INFEASIBLE  # an old store's value reads back


@pytest.mark.parametrize("engine", engine_names())
def test_every_registered_engine_has_its_space_and_consistent_facts(engine):
    adapter = get_engine(engine)
    assert adapter.name == engine and load_space(engine).engine == engine
    assert adapter.display_program() and adapter.classify_failure(1, "") == Outcome.CRASH
    assert adapter.simulated != adapter.needs_gpu  # a simulator needs no GPU; a real engine does
    if adapter.image:
        command, args = adapter.container("org/model")
        assert "org/model" in args and str(adapter.port) in args
    else:
        with pytest.raises(NotImplementedError):
            adapter.container("org/model")


def test_an_engine_s_version_comes_from_its_metadata_without_importing_it(tmp_path, monkeypatch):
    import dataclasses
    import sys

    site = tmp_path / "site"
    (site / "slow_engine").mkdir(parents=True)
    (site / "slow_engine" / "__init__.py").write_text("raise SystemExit('imported')\n")  # as slow as vLLM's
    info = site / "slow_engine-1.2.3+cpu.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: slow-engine\nVersion: 1.2.3+cpu\n")
    (site / "bare_engine").mkdir()
    (site / "bare_engine" / "__init__.py").write_text("__version__ = '4.5.6'\n")  # a checkout: no metadata
    monkeypatch.setenv("PYTHONPATH", str(site))
    vllm = get_engine("vllm")
    assert dataclasses.replace(vllm, package="slow_engine").version(sys.executable) == "1.2.3"
    assert dataclasses.replace(vllm, package="bare_engine").version(sys.executable) == "4.5.6"
    assert dataclasses.replace(vllm, package="absent_engine").version(sys.executable) == "unknown"
