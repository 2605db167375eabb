"""Start-up phases read from vLLM's and SGLang's own log lines, and the fast-start flags and environment of a trial."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tuner.engines import get_engine
from tuner.engines.base import Launch
from tuner.engines.probe import flags_in
from tuner.engines.startup_phases import parse_startup
from tuner.space.knobs import load_space

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


def _epoch(text: str) -> float:  # "12-01 20:00:10" in the year of the fixture, local time as vLLM logs it
    return time.mktime(time.strptime(f"2026-{text}", "%Y-%m-%d %H:%M:%S"))


def test_vllm_0_26_gpu_start_up_broken_into_phases():
    # lines in vLLM 0.26.0's own format strings (gpu_model_runner.py, monitor.py, core.py; see the fixture)
    log = (FIXTURES / "startup-0.26.0-gpu-lines.log").read_text()
    launched = _epoch("12-01 20:00:05")
    ready_s = 71.5  # /health answered at 20:01:16.5
    phases = parse_startup(log, get_engine("vllm").startup_patterns(), launched, ready_s).to_dict()
    assert list(phases) == ["import", "model_load", "torch_compile", "kv_profile", "cuda_graphs", "api_up",
                            "other", "ready"]
    assert phases["import"] == 12.0  # launch to the API server's first line
    assert phases["model_load"] == 6.22 and phases["torch_compile"] == 25.31 and phases["cuda_graphs"] == 9.0
    assert phases["kv_profile"] == pytest.approx(38.60 - 25.31 - 9, abs=0.01)  # init engine minus its parts
    assert phases["api_up"] == 4.5  # "init engine" line (20:01:12) to ready
    assert phases["ready"] == 71.5
    assert sum(v for k, v in phases.items() if k != "ready") == pytest.approx(71.5, abs=0.05)


def test_a_real_cpu_start_up_without_compile_or_graphs_has_only_the_phases_it_printed():
    # vLLM 0.32.0 CPU build, --enforce-eager: no torch.compile, no graph capture lines
    log = (FIXTURES / "ok-backend-ignored-on-cpu.log").read_text()
    launched = _epoch("11-22 20:11:28")
    phases = parse_startup(log, get_engine("vllm").startup_patterns(), launched, 14.0).to_dict()
    assert "torch_compile" not in phases and "cuda_graphs" not in phases
    assert phases["import"] == 6.0 and phases["kv_profile"] == 0.10
    assert phases["api_up"] == pytest.approx(launched + 14.0 - _epoch("11-22 20:11:39"))
    assert phases["other"] >= 0 and phases["ready"] == 14.0


def _sglang_epoch(text: str) -> float:  # "2026-12-02 11:13:42", local time as SGLang logs it
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def test_sglang_0_5_17_h200_start_up_broken_into_phases():
    # SGLang 0.5.17 on the H200 (round 6), the load's request lines left out: its prefill CUDA graphs are most of it
    log = (FIXTURES.parent / "sglang" / "startup-0.5.17-h200.log").read_text()
    launched = _sglang_epoch("2026-12-02 11:13:20")
    ready_s = _sglang_epoch("2026-12-02 11:15:38") - launched  # /health answered after its first prefill
    phases = parse_startup(log, get_engine("sglang").startup_patterns(), launched, ready_s).to_dict()
    assert list(phases) == ["import", "model_load", "kv_cache", "prefill_graphs", "cuda_graphs", "api_up",
                            "other", "ready"]
    assert phases["import"] == 22.0  # launch to the first stamped line (11:13:42)
    assert phases["model_load"] == 0.24 and phases["kv_cache"] == 0.04
    assert phases["prefill_graphs"] == 68.52 and phases["cuda_graphs"] == 6.06
    assert phases["api_up"] == 11.0  # "max_total_num_tokens=" (11:15:27) to ready
    assert phases["other"] == pytest.approx(138 - 22 - 0.24 - 0.04 - 68.52 - 6.06 - 11, abs=0.01)
    assert sum(v for k, v in phases.items() if k != "ready") == pytest.approx(ready_s, abs=0.05)


def test_sglang_h100_start_up_reads_the_same_lines():
    log = (FIXTURES.parent / "sglang" / "ok-h100-startup.log").read_text()
    launched = _sglang_epoch("2026-11-22 23:29:15")
    phases = parse_startup(log, get_engine("sglang").startup_patterns(), launched, 100.0).to_dict()
    assert phases["prefill_graphs"] == 47.32 and phases["cuda_graphs"] == 5.81 and phases["model_load"] == 0.26
    assert phases["import"] == 6.0 and phases["api_up"] == pytest.approx(launched + 100 - _sglang_epoch(
        "2026-11-22 23:30:52"))


def test_engines_without_patterns_and_failed_starts_record_nothing_made_up():
    assert get_engine("sim").startup_patterns() is None
    assert get_engine("sim").startup_phases("INFO 12-01 20:00:24 [core.py:1] init engine (profile, create kv cache, "
                                            "warmup model) took 3.00 s", time.time(), 5.0) == {}
    phases = parse_startup("Traceback (most recent call last):\n", get_engine("vllm").startup_patterns(),
                           time.time(), 0.0)
    assert phases.to_dict() == {}


def _vllm_spec(config: dict, baseline: bool = False, extra: tuple[str, ...] = ()):
    space = load_space("vllm")
    launch = Launch(config={**space.defaults(), **config}, model="/models/llama", baseline=baseline,
                    extra_args=extra)
    engine = get_engine("vllm")
    return engine.server_spec(launch, space), engine.serve_command(launch, space)


@pytest.mark.parametrize("seqs,cap", [(64, "64"), (48, "48"), (100, "104"), (256, "256"), (1, "1")])
def test_graph_capture_stops_at_what_max_num_seqs_can_use(seqs, cap):
    spec, command = _vllm_spec({"max_num_seqs": seqs})
    for argv in (spec.argv, command):  # the exported command starts the server that was measured
        assert argv[argv.index("--max-cudagraph-capture-size") + 1] == cap


@pytest.mark.parametrize("config,extra", [
    ({"max_num_seqs": 512}, ()),  # vLLM's own cap, 512, is already no larger
    ({"max_num_seqs": 64, "cuda_graphs": False}, ()),  # eager: no graphs to capture
    ({"max_num_seqs": 64, "speculative_method": "ngram", "num_speculative_tokens": 3}, ()),  # decode > 1 token
    ({"max_num_seqs": 64}, ("--cudagraph-capture-sizes", "1", "2")),  # the user chose the sizes
    ({"max_num_seqs": 64}, ("-cc.cudagraph_mode=NONE",)),
    ({}, ()),  # the space default, 1024 sequences: vLLM caps at 512 itself
])
def test_graph_capture_left_alone_when_it_would_not_be_a_cut(config, extra):
    spec, command = _vllm_spec(config, extra=extra)
    assert "--max-cudagraph-capture-size" not in spec.argv and "--max-cudagraph-capture-size" not in command


def test_the_defaults_baseline_carries_no_tuned_flag_but_shares_the_compile_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    spec, command = _vllm_spec({"max_num_seqs": 64}, baseline=True)
    assert "--max-cudagraph-capture-size" not in spec.argv and "--max-num-seqs" in spec.argv
    assert command == ["vllm", "serve", "/models/llama", "--max-num-seqs", "64"]
    tuned, _ = _vllm_spec({"max_num_seqs": 32})
    assert spec.env["VLLM_CACHE_ROOT"] == tuned.env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-compile")
    # never vLLM's start-up plan: its key leaves out gpu_memory_utilization, a knob
    assert "VLLM_ENABLE_STARTUP_PLAN" not in spec.env


def test_every_configuration_shares_one_triton_kernel_cache(monkeypatch, tmp_path):
    # vLLM 0.26's AOT compile points torch's caches (Triton's kernels included) into a folder per compile key
    monkeypatch.setenv("SERVETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    defaults, _ = _vllm_spec({}, baseline=True)
    small, _ = _vllm_spec({"max_num_batched_tokens": 2048})
    large, _ = _vllm_spec({"max_num_batched_tokens": 5729, "quantization": "fp8"})
    assert defaults.env["TRITON_CACHE_DIR"] == small.env["TRITON_CACHE_DIR"] == large.env["TRITON_CACHE_DIR"] == \
        str(tmp_path / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/scratch/triton")
    assert "TRITON_CACHE_DIR" not in _vllm_spec({})[0].env  # the server inherits the user's own


def test_a_cache_place_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", "/scratch/vllm")
    spec, _ = _vllm_spec({})
    assert "VLLM_CACHE_ROOT" not in spec.env  # the server inherits the user's own
    space = load_space("vllm")
    launch = Launch(config=space.defaults(), model="m", extra_env=(("VLLM_CACHE_ROOT", "/x"),))
    assert get_engine("vllm").server_spec(launch, space).env["VLLM_CACHE_ROOT"] == "/x"


def test_the_engine_core_is_forked_unless_the_user_chose_a_start_method(monkeypatch):
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    spec, _ = _vllm_spec({})
    assert spec.env["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"  # `vllm serve` alone would spawn it
    space = load_space("vllm")
    launch = Launch(config=space.defaults(), model="m", extra_env=(("VLLM_WORKER_MULTIPROC_METHOD", "spawn"),))
    assert get_engine("vllm").server_spec(launch, space).env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in _vllm_spec({})[0].env  # the server inherits the user's own


@pytest.mark.vllm_cpu
@pytest.mark.skipif(not os.environ.get("SERVETUNE_VLLM_PYTHON"), reason="SERVETUNE_VLLM_PYTHON is not set")
def test_real_vllm_s_cli_keeps_the_start_method_it_is_given():
    # one interpreter asks twice, unset then set (vLLM imported once: 25 s on 2 cores)
    code = ("import os; from vllm.entrypoints.serve.utils.api_utils import cli_env_setup\n"
            "for given in (None, 'fork'):\n"
            "    os.environ.pop('VLLM_WORKER_MULTIPROC_METHOD', None)\n"
            "    os.environ.update({'VLLM_WORKER_MULTIPROC_METHOD': given} if given else {})\n"
            "    cli_env_setup(); print(os.environ['VLLM_WORKER_MULTIPROC_METHOD'])")
    bare = {k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"}
    methods = subprocess.run([os.environ["SERVETUNE_VLLM_PYTHON"], "-c", code], env=bare, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()[-2:]
    assert methods[0] == "spawn"  # what vLLM does alone: the engine core imports vLLM again
    assert methods[1] == "fork"


def test_fast_start_flags_exist_in_vllm_0_26_help():
    available = flags_in((FIXTURES / "vllm-0.26.0-serve-help.txt").read_text())
    spec, _ = _vllm_spec({"max_num_seqs": 64})
    assert {a for a in spec.argv if a.startswith("--")} <= available
    assert "--max-cudagraph-capture-size" in available
