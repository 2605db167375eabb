"""Search spaces from YAML, flag rendering both ways, and the known constraints."""

from __future__ import annotations

import pytest

from tuner.errors import InputError
from tuner.hardware.gpus import get_gpu
from tuner.models.shapes import get_shape
from tuner.space.constraints import Context, gpus_needed, violations
from tuner.space.flags import parse_flags, render_flags
from tuner.space.knobs import load_space


@pytest.mark.parametrize("engine", ["vllm", "sglang", "sim"])
def test_shipped_spaces_load_and_defaults_render_no_flags_for_the_baseline(engine):
    space = load_space(engine)
    assert space.engine == engine
    defaults = space.defaults()
    assert "num_speculative_tokens" not in defaults  # its condition (a speculative method) does not hold
    assert render_flags(space, defaults, baseline=True) == []


def test_vllm_flags_round_trip():
    space = load_space("vllm")
    config = dict(space.defaults(), max_num_seqs=64, max_num_batched_tokens=4096, enable_prefix_caching=False,
                  cuda_graphs=False, speculative_method="ngram", num_speculative_tokens=3,
                  attention_backend="FLASHINFER", kv_cache_dtype="fp8", gpu_memory_utilization=0.85)
    argv = render_flags(space, config)
    assert argv[argv.index("--max-num-seqs") + 1] == "64"
    assert "--no-enable-prefix-caching" in argv and "--enforce-eager" in argv
    assert argv[argv.index("--speculative-config") + 1] == '{"method":"ngram","num_speculative_tokens":3}'
    assert argv[argv.index("--attention-backend") + 1] == "FLASHINFER"
    assert parse_flags(space, argv) == space.active_config(config)
    assert parse_flags(space, render_flags(space, space.defaults())) == space.defaults()


def test_sglang_flag_names_differ_from_vllm():
    space = load_space("sglang")
    config = dict(space.defaults(), max_num_seqs=32, enable_prefix_caching=False, tensor_parallel_size=2)
    argv = render_flags(space, config)
    assert argv[argv.index("--max-running-requests") + 1] == "32"
    assert argv[argv.index("--tp-size") + 1] == "2"
    assert "--disable-radix-cache" in argv
    assert "--max-num-seqs" not in argv


def test_baseline_keeps_only_knobs_moved_by_fix():
    space = load_space("vllm")
    space.fix("max_num_seqs", "256")
    assert render_flags(space, space.defaults(), baseline=True) == ["--max-num-seqs", "256"]
    assert space.knobs["max_num_seqs"].fixed


def test_exclude_group_freezes_its_knobs():
    space = load_space("sim")
    space.exclude("speculative")
    assert space.knobs["speculative_method"].fixed
    assert space.knobs["speculative_method"].default == "none"


@pytest.mark.parametrize("fix, message", [
    (("max_num_seqs", "lots"), "not a valid int"),
    (("max_num_seqs", "5000"), "outside"),
    (("no_such_knob", "1"), "unknown knob"),
    (("attention_backend", "FAST"), "not one of"),
])
def test_bad_fix_names_the_knob(fix, message):
    space = load_space("vllm")
    with pytest.raises(InputError, match=message):
        space.fix(*fix)


def test_bad_yaml_names_file_line_and_key(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("engine: vllm\nknobs:\n  max_num_seqs: {type: int, low: 8, high: 4, default: 8}\n")
    with pytest.raises(InputError) as err:
        load_space(str(bad))
    assert "knobs.max_num_seqs.low" in str(err.value) and str(bad) in str(err.value)

    broken = tmp_path / "broken.yaml"
    broken.write_text("engine: vllm\nknobs:\n  a: [1, 2\n")
    with pytest.raises(InputError) as err:
        load_space(str(broken))
    assert f"{broken}:" in str(err.value) and "invalid YAML" in str(err.value)

    typo = tmp_path / "typo.yaml"
    typo.write_text("engine: vllm\nknobs:\n  max_num_seqs: {type: int, low: 8, high: 64, default: 8, flg: --x}\n")
    with pytest.raises(InputError, match="unknown key 'flg'"):
        load_space(str(typo))


def test_user_space_extends_common(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("engine: vllm\nextends: common.yaml\nknobs:\n"
                   "  max_num_seqs: {flag: --max-num-seqs, low: 16, high: 64, default: 32}\n")
    space = load_space(str(own))
    assert list(space.knobs) == ["max_num_seqs"]
    assert (space.knobs["max_num_seqs"].low, space.knobs["max_num_seqs"].high) == (16, 64)


def test_constraints_give_reasons():
    llama = get_shape("llama-3.1-8b")
    ctx = Context(gpus=4, gpu=get_gpu("a100"), model=llama, max_model_len=32768)
    config = {"tensor_parallel_size": 8, "pipeline_parallel_size": 1, "data_parallel_size": 1,
              "max_num_seqs": 512, "max_num_batched_tokens": 256, "kv_cache_dtype": "fp8",
              "enable_chunked_prefill": False, "enable_expert_parallel": True}
    reasons = " | ".join(violations(config, ctx))
    assert "exceeds the 4 GPUs" in reasons
    assert "256 < max running requests 512" in reasons
    assert "needs FP8" in reasons
    assert "max model length 32768" in reasons
    assert "mixture-of-experts" in reasons
    assert gpus_needed(config) == 8
    ok = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "data_parallel_size": 2,
          "max_num_seqs": 64, "max_num_batched_tokens": 4096}
    assert violations(ok, Context(gpus=4, gpu=get_gpu("h100"), model=llama)) == []
    heads = Context(gpus=8, model=get_shape("tiny-llama"))
    assert any("not divisible by TP=8" in r for r in violations({"tensor_parallel_size": 8}, heads))


def test_a_single_choice_is_the_value_sampled_even_when_the_engine_default_differs():
    import optuna

    from tuner.study.sampling import suggest_config

    own = load_space("vllm")
    own.knobs["max_num_seqs"] = own.knobs["max_num_seqs"].__class__(
        **{**own.knobs["max_num_seqs"].__dict__, "type": "categorical", "choices": (256,), "low": None, "high": None})
    study = optuna.create_study()
    _, config = suggest_config(study.ask(), {"vllm": own})
    assert config["max_num_seqs"] == 256
    _, baseline = suggest_config(study.ask(), {"vllm": own}, baseline=True)
    assert baseline["max_num_seqs"] == 1024  # trial 0 runs the engine's own default


def test_a_study_of_several_engines_starts_with_each_engine_s_defaults_in_the_order_given():
    import optuna

    from tuner.study.sampling import every_engines_defaults, suggest_config

    spaces = {"sglang": load_space("sglang"), "vllm": load_space("vllm")}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for params in every_engines_defaults(spaces):
        study.enqueue_trial(params, user_attrs={"baseline": True})
    first, second, third = study.ask(), study.ask(), study.ask()
    assert [t.user_attrs.get("baseline") for t in (first, second, third)] == [True, True, None]
    assert suggest_config(first, spaces, baseline=True) == ("sglang", spaces["sglang"].defaults())
    assert suggest_config(second, spaces, baseline=True) == ("vllm", spaces["vllm"].defaults())
    assert spaces["sglang"].defaults() != spaces["vllm"].defaults()
    assert every_engines_defaults({"vllm": spaces["vllm"]}) == [{}]  # one engine: no engine parameter
