"""vLLM's start-up, for its adapter: the log lines of each start-up phase, and what shortens a start
(a shared compile cache and Triton kernel cache, CUDA graphs captured only up to the batch sizes a trial can
reach)."""

from __future__ import annotations

import os
import re

from tuner.engines.base import Launch, cache_root
from tuner.engines.startup_phases import PhasePattern, StartupPatterns

# vLLM 0.26.0's CUDA-graph capture sizes when none are given: [1, 2, 4] + range(8, 256, 8) +
# range(256, max + 1, 16), max = min(2 * max_num_seqs, 512) (`vllm serve --help=all`).
CAPTURE_SIZES = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
# flags that set CUDA graphs or compilation themselves: a trial that has one is left as it is
GRAPH_FLAGS = ("--enforce-eager", "--cudagraph-capture-sizes", "--max-cudagraph-capture-size",
               "--compilation-config", "-cc", "-O", "--optimization-level", "--speculative-config")

# the messages of vLLM 0.26.0 (gpu_model_runner.py, compilation/monitor.py and decorators.py, v1/engine/core.py)
PATTERNS = StartupPatterns(
    phases=(
        PhasePattern("model_load", re.compile(r"Model loading took \S+ GiB(?: memory)? and ([\d.]+) s")),
        PhasePattern("torch_compile", re.compile(r"torch\.compile (?:and initial profiling/warmup run together )?"
                                                 r"(?:took|takes) ([\d.]+) s in total")),
        PhasePattern("kv_profile", re.compile(r"init engine \(profile, create kv cache, warmup model\) took "
                                              r"([\d.]+) s"), minus=("torch_compile", "cuda_graphs")),
        PhasePattern("cuda_graphs", re.compile(r"Graph capturing finished in ([\d.]+) secs")),
    ),
    clock=re.compile(r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) \["),
    initialised=re.compile(r"init engine \(profile, create kv cache, warmup model\) took"),
)


def _graph_flag(arg: str) -> bool:
    return any(arg == flag or arg.startswith((flag + "=", flag + ".")) for flag in GRAPH_FLAGS) or \
        re.fullmatch(r"-O\d", arg) is not None


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None  # the last one counts, as with argparse
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def capture_cap_args(launch: Launch, flags: list[str]) -> list[str]:
    """Capture CUDA graphs only up to the trial's --max-num-seqs (decode batches are never larger;
    vLLM's own default goes to twice that): the smallest of vLLM's default sizes that holds it."""
    if launch.baseline or "--max-num-seqs" not in flags:
        return []
    argv = [*flags, *launch.extra_args]
    if any(_graph_flag(arg) for arg in argv):
        return []
    try:
        seqs = int(_flag_value(argv, "--max-num-seqs") or "")
    except ValueError:
        return []
    cap = next((size for size in CAPTURE_SIZES if size >= seqs), None)
    if cap is None or cap >= min(2 * seqs, 512):
        return []
    return ["--max-cudagraph-capture-size", str(cap)]


def fast_start_env(env: dict[str, str]) -> dict[str, str]:
    """One compile cache for every trial and study on the machine, unless the user chose a place; one Triton
    kernel cache for every configuration; the engine core forked from the API server, unless the user chose a
    start method.

    vLLM keys its compile cache by everything that shapes the graph (`max_num_batched_tokens` and the CUDA-graph
    sizes included), and with AOT compile (0.26's default) points TORCHINDUCTOR_CACHE_DIR into that key's folder,
    where torch then keeps Triton's compiled kernels too (`triton_cache_dir`: TRITON_CACHE_DIR, else
    `<inductor cache>/triton`). So a configuration that differs from an earlier one in batched tokens alone
    compiled every kernel again. Triton's cache is keyed by each kernel's source and options, so one folder for
    all configurations serves each the kernels it would have compiled, no others. TRITON_CACHE_DIR is not in
    vLLM's compile-cache key.

    `vllm serve` sets VLLM_WORKER_MULTIPROC_METHOD=spawn when it is unset (`cli_env_setup`), so its engine core
    process imported vLLM and torch again: 16-18 s of every start on the H200, forked servers included (stack
    samples, experiments/h200-goodput/README.md). Forking is vLLM's own default as a library; vLLM still spawns
    when the API server has initialised CUDA, and on CPU (`_maybe_force_spawn`, `CpuPlatform`). Neither
    variable is in vLLM's compile-cache key (`envs.compile_factors`).

    Not vLLM 0.26's start-up plan (VLLM_ENABLE_STARTUP_PLAN=1, the KV size of an earlier profile reused):
    its key (`VllmConfig.compute_hash()`) leaves out gpu_memory_utilization and max_num_seqs, so a trial
    that moves only those would be served with an earlier trial's KV cache."""
    out = dict(env)
    if "VLLM_CACHE_ROOT" not in out and "VLLM_CACHE_ROOT" not in os.environ:
        out["VLLM_CACHE_ROOT"] = str(cache_root() / "vllm-compile")
    if "TRITON_CACHE_DIR" not in out and "TRITON_CACHE_DIR" not in os.environ:
        out["TRITON_CACHE_DIR"] = str(cache_root() / "triton")
    if "VLLM_WORKER_MULTIPROC_METHOD" not in out and "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ:
        out["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    return out
