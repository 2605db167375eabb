"""vLLM: `vllm serve`, launched as a process with the interpreter that has vLLM installed."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from tuner.engines.base import Engine, FailureClass, Launch, cache_root, patterns
from tuner.engines.startup_phases import PhasePattern, StartupPatterns

# vLLM 0.26.0's CUDA-graph capture sizes when none are given: [1, 2, 4] + range(8, 256, 8) +
# range(256, max + 1, 16), max = min(2 * max_num_seqs, 512) (`vllm serve --help=all`).
_CAPTURE_SIZES = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
# flags that set CUDA graphs or compilation themselves: a trial that has one is left as it is
_GRAPH_FLAGS = ("--enforce-eager", "--cudagraph-capture-sizes", "--max-cudagraph-capture-size",
                "--compilation-config", "-cc", "-O", "--optimization-level", "--speculative-config")


def _graph_flag(arg: str) -> bool:
    return any(arg == flag or arg.startswith((flag + "=", flag + ".")) for flag in _GRAPH_FLAGS) or \
        re.fullmatch(r"-O\d", arg) is not None


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _seconds(regex: str) -> re.Pattern:
    return re.compile(regex)


@dataclass
class VllmEngine(Engine):
    name: str = "vllm"
    package: str = "vllm"
    metrics_prefix: str = "vllm:"
    failure_patterns: list = field(default_factory=lambda: patterns(
        (FailureClass.OOM_STARTUP, r"No available memory for the cache blocks|is less than desired GPU memory "
                                   r"utilization|larger than the available KV cache memory|is less than requested "
                                   r"memory for kv|CUDA out of memory occurred when warming up|"
                                   r"DefaultCPUAllocator: can't allocate memory"),
        (FailureClass.OOM_LOAD, r"OutOfMemoryError|CUDA out of memory"),
        (FailureClass.UNSUPPORTED, r"Unknown attention backend|(Error|Exception): .*(\bnot supported\b|"
                                   r"\bunsupported\b|is not valid for this configuration)"),
        (FailureClass.INVALID_CONFIG, r"must be greater than or equal to max_num_seqs|must be divisible by|"
                                      r"is smaller than max_model_len|validation error for|"
                                      r"error: (argument|unrecognized arguments)"),
    ))

    def program(self, launch: Launch) -> list[str]:
        return [launch.python, "-m", "vllm.entrypoints.cli.main", "serve"]

    def display_program(self) -> list[str]:
        return ["vllm", "serve"]

    def model_args(self, launch: Launch) -> list[str]:
        return [launch.model, *(["--max-model-len", str(launch.max_model_len)] if launch.max_model_len else []),
                *(["--load-format", "dummy"] if launch.dummy_weights else [])]

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        out = {}
        drafts, drafted = values.get("spec_decode_num_drafts_total"), values.get("spec_decode_num_draft_tokens_total")
        accepted = values.get("spec_decode_num_accepted_tokens_total")
        if drafted and accepted is not None:
            out["spec_decode_acceptance_rate"] = accepted / drafted
        if drafts and accepted is not None:  # each draft step also yields one token of the target model
            out["spec_decode_mean_accepted_length"] = 1 + accepted / drafts
        if values.get("prefix_cache_queries_total"):
            hits = values.get("prefix_cache_hits_total", 0.0)
            out["prefix_cache_hit_rate"] = hits / values["prefix_cache_queries_total"]
        return out

    def help_argv(self, python: str) -> list[str]:
        return [python, "-m", "vllm.entrypoints.cli.main", "serve", "--help=all"]

    def fast_start_args(self, launch: Launch, flags: list[str]) -> list[str]:
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
        cap = next((size for size in _CAPTURE_SIZES if size >= seqs), None)
        if cap is None or cap >= min(2 * seqs, 512):
            return []
        return ["--max-cudagraph-capture-size", str(cap)]

    def startup_patterns(self) -> StartupPatterns:
        return StartupPatterns(
            phases=(
                PhasePattern("model_load", _seconds(r"Model loading took \S+ GiB(?: memory)? and ([\d.]+) s")),
                PhasePattern("torch_compile", _seconds(r"torch\.compile (?:and initial profiling/warmup run "
                                                       r"together )?(?:took|takes) ([\d.]+) s in total")),
                PhasePattern("kv_profile", _seconds(r"init engine \(profile, create kv cache, warmup model\) "
                                                    r"took ([\d.]+) s"), minus=("torch_compile", "cuda_graphs")),
                PhasePattern("cuda_graphs", _seconds(r"Graph capturing finished in ([\d.]+) secs")),
            ),
            clock=re.compile(r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) \["),
            initialised=re.compile(r"init engine \(profile, create kv cache, warmup model\) took"),
        )

    def environment(self, launch: Launch) -> dict[str, str]:
        env = super().environment(launch)
        # one compile cache (and start-up plan: the KV size a profile found, reused only when model, flags,
        # GPU and free memory match) for every trial and study on the machine, unless the user chose a place
        if "VLLM_CACHE_ROOT" not in env and "VLLM_CACHE_ROOT" not in os.environ:
            env["VLLM_CACHE_ROOT"] = str(cache_root() / "vllm-compile")
        env.setdefault("VLLM_ENABLE_STARTUP_PLAN", os.environ.get("VLLM_ENABLE_STARTUP_PLAN", "1"))
        if launch.api_key:
            env["VLLM_API_KEY"] = launch.api_key  # not on argv, where `ps` would show it
        return env
