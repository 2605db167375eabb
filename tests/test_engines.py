"""Engine adapters: argv from one config, failure classes from real vLLM logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.engines import get_engine
from tuner.engines.base import FailureClass, Launch
from tuner.errors import InputError
from tuner.space.flags import parse_flags
from tuner.space.knobs import load_space

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


@pytest.mark.parametrize("name, expected", [
    ("fail-invalid-config-batched-tokens.log", FailureClass.INVALID_CONFIG),
    ("fail-kv-too-small.log", FailureClass.OOM_STARTUP),
    ("fail-kv-exceeds-memory.log", FailureClass.OOM_STARTUP),
    ("fail-oom-weights.log", FailureClass.OOM_STARTUP),
    ("fail-unsupported-backend.log", FailureClass.UNSUPPORTED),
    ("fail-bad-flag.log", FailureClass.INVALID_CONFIG),
    ("fail-max-model-len-too-long.log", FailureClass.INVALID_CONFIG),
    ("fail-unsupported-flex-fp8-h100.log", FailureClass.UNSUPPORTED),  # vLLM 0.26.0 on the H100
])
def test_vllm_failures_classified_from_real_logs(name, expected):
    log = (FIXTURES / name).read_text()
    assert get_engine("vllm").classify_failure(1, log) == expected


def test_healthy_log_with_a_backend_warning_is_not_a_known_failure():
    log = (FIXTURES / "ok-backend-ignored-on-cpu.log").read_text()
    assert get_engine("vllm").classify_failure(None, log) == FailureClass.CRASH


def test_vllm_metrics_parsed_from_real_scrape():
    metrics = get_engine("vllm").engine_metrics((FIXTURES / "metrics-sample.txt").read_text())
    assert metrics["generation_tokens_total"] > 0
    assert "num_preemptions_total" in metrics and "kv_cache_usage_perc" in metrics
    assert not any(name.endswith("_bucket") for name in metrics)


@pytest.mark.parametrize("engine", ["vllm", "sglang", "sim"])
def test_one_config_gives_each_engine_its_argv_and_parses_back(engine):
    space = load_space(engine)
    config = dict(space.defaults(), max_num_seqs=48, enable_prefix_caching=False, tensor_parallel_size=2)
    model = "llama-3.1-8b" if engine == "sim" else "/models/llama"
    launch = Launch(config=config, model=model, port=8123, api_key="sekret", time_scale=5)
    adapter = get_engine(engine)
    spec = adapter.server_spec(launch, space)
    assert spec.url == "http://127.0.0.1:8123"
    assert spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"
    command = adapter.serve_command(launch, space)
    assert "8123" not in command and "sekret" not in command  # tuner-internal port and key stay out
    assert parse_flags(space, command) == space.active_config(config)
    if engine == "vllm":
        assert command[:3] == ["vllm", "serve", "/models/llama"]
        assert spec.env["VLLM_API_KEY"] == "sekret" and "sekret" not in spec.argv
    if engine == "sglang":
        assert command[:4] == ["python", "-m", "sglang.launch_server", "--model-path"]
    if engine == "sim":
        assert spec.clock_scale == 5


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


def test_sglang_flags_exist_in_the_pinned_version():
    from tuner.engines.probe import flags_in

    available = flags_in((Path(__file__).parent / "fixtures" / "sglang" / "sglang-0.5.23-flags.txt").read_text())
    space = load_space("sglang")
    config = dict(space.defaults(), max_num_seqs=64, enable_prefix_caching=False, cuda_graphs=False,
                  speculative_method="NGRAM", num_speculative_tokens=4, kv_cache_dtype="fp8_e4m3",
                  attention_backend="fa3", tensor_parallel_size=2)
    launch = Launch(config=config, model="/models/llama")
    argv = get_engine("sglang").server_spec(launch, space).argv
    used = {a for a in argv if a.startswith("--")}
    assert used <= available, used - available
    assert "--max-running-requests" in used and "--disable-radix-cache" in used
