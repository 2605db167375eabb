"""vLLM: `vllm serve`, launched as a process with the interpreter that has vLLM installed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tuner.engines.base import Engine, Launch, key_file_args, patterns
from tuner.engines.registry import register_engine
from tuner.outcome import Outcome


@register_engine("vllm")
@dataclass
class VllmEngine(Engine):
    auto: ClassVar[bool] = True
    image: ClassVar[str] = "vllm/vllm-openai"  # its entrypoint is the OpenAI API server: args are `vllm serve`'s flags
    port: ClassVar[int] = 8000
    # the API server's imports and its engine core's (forked from it on a GPU): all before CUDA starts
    preload_modules: ClassVar[tuple[str, ...]] = (
        "vllm.entrypoints.cli.main", "vllm.entrypoints.openai.api_server", "vllm.v1.engine.core",
        "vllm.v1.executor.multiproc_executor", "vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner",
        "vllm.compilation.backends")
    name: str = "vllm"
    package: str = "vllm"
    metrics_prefix: str = "vllm:"
    failure_patterns: list = field(default_factory=lambda: patterns(
        # a traceback's last line (not a warning that quotes one): the install lacks a module
        (Outcome.ENVIRONMENT, r"^(\(\w+ pid=\d+\) )?(ERROR .*\] )?(ModuleNotFoundError|ImportError): "),
        (Outcome.OOM_STARTUP, r"No available memory for the cache blocks|is less than desired GPU memory "
                              r"utilization|larger than the available KV cache memory|is less than requested "
                              r"memory for kv|CUDA out of memory occurred when warming up|"
                              r"DefaultCPUAllocator: can't allocate memory"),
        (Outcome.OOM_LOAD, r"OutOfMemoryError|CUDA out of memory"),
        (Outcome.UNSUPPORTED, r"Unknown attention backend|(Error|Exception): .*(\bnot supported\b|"
                              r"\bunsupported\b|is not valid for this configuration)"),
        (Outcome.INVALID_CONFIG, r"must be greater than or equal to max_num_seqs|must be divisible by|"
                                 r"is smaller than max_model_len|validation error for|"
                                 r"error: (argument|unrecognized arguments)"),
    ))

    def program(self, launch: Launch) -> list[str]:
        return [launch.python, "-m", "vllm.entrypoints.cli.main", "serve"]

    def display_program(self) -> list[str]:
        return ["vllm", "serve"]

    def container(self, model: str) -> tuple[list[str], list[str]]:
        return [], ["--model", model, "--port", str(self.port)]

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

    def environment(self, launch: Launch) -> dict[str, str]:
        from tuner.engines.vllm_startup import fast_start_env

        return fast_start_env(super().environment(launch))

    def connection_args(self, launch: Launch) -> list[str]:
        args = super().connection_args(launch)
        # The key goes in a 0600 `--config` file, not on argv (`ps`) and not in VLLM_API_KEY: vLLM 0.26 hashes
        # that variable into its compile-cache key, so a fresh key per server meant no server ever hit the cache.
        return args + key_file_args(launch)

    def fast_start_args(self, launch: Launch, flags: list[str]) -> list[str]:
        from tuner.engines.vllm_startup import capture_cap_args

        return capture_cap_args(launch, flags)

    def startup_patterns(self):  # the StartupPatterns of vLLM 0.26's log
        from tuner.engines.vllm_startup import PATTERNS

        return PATTERNS
