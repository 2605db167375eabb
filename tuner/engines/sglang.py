"""SGLang: `python -m sglang.launch_server`, launched as a process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tuner.engines.base import Engine, Launch, key_file_args, patterns
from tuner.engines.registry import register_engine
from tuner.outcome import Outcome


@register_engine("sglang")
@dataclass
class SglangEngine(Engine):
    image: ClassVar[str] = "lmsysorg/sglang"  # no serving entrypoint: the command is given
    port: ClassVar[int] = 30000
    model_flag: ClassVar[str] = "--model-path"
    name: str = "sglang"
    package: str = "sglang"
    metrics_prefix: str = "sglang:"
    failure_patterns: list = field(default_factory=lambda: patterns(
        # a traceback's last line (not a warning that quotes one): the install lacks a module
        (Outcome.ENVIRONMENT, r"^(\(\w+ pid=\d+\) )?(ERROR .*\] )?(ModuleNotFoundError|ImportError): "),
        (Outcome.OOM_STARTUP, r"Not enough memory\. Please try to increase --mem-fraction-static|"
                              r"Capture cuda graph failed"),
        (Outcome.OOM_LOAD, r"OutOfMemoryError|CUDA out of memory"),
        (Outcome.UNSUPPORTED,
         r"(Error|Exception): .*(\bnot supported\b|\bunsupported\b|is not valid for this configuration)"),
        (Outcome.INVALID_CONFIG, r"error: (argument|unrecognized|ambiguous option)|invalid choice"),
    ))

    def program(self, launch: Launch) -> list[str]:
        return [launch.python, "-m", "sglang.launch_server"]

    def display_program(self) -> list[str]:
        return ["python", "-m", "sglang.launch_server"]

    def container(self, model: str) -> tuple[list[str], list[str]]:
        return ["python3", "-m", "sglang.launch_server"], [self.model_flag, model, "--host", "0.0.0.0",
                                                          "--port", str(self.port)]

    def model_args(self, launch: Launch) -> list[str]:
        return [self.model_flag, launch.model, "--enable-metrics",
                *(["--context-length", str(launch.max_model_len)] if launch.max_model_len else []),
                *(["--load-format", "dummy"] if launch.dummy_weights else [])]

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        out = {}
        if values.get("spec_accept_length"):  # gauges of the last batches; 0 when nothing is drafted
            out["spec_decode_mean_accepted_length"] = values["spec_accept_length"]
            out["spec_decode_acceptance_rate"] = values.get("spec_accept_rate", 0.0)
        if values.get("prompt_tokens_total"):  # `cache_hit_rate` is a gauge of recent batches; this is the run's
            out["prefix_cache_hit_rate"] = values.get("cached_tokens_total", 0.0) / values["prompt_tokens_total"]
        return out

    def help_argv(self, python: str) -> list[str]:
        return [python, "-m", "sglang.launch_server", "--help"]

    def startup_patterns(self):  # the StartupPatterns of SGLang 0.5.17's log
        from tuner.engines.sglang_startup import PATTERNS

        return PATTERNS

    def connection_args(self, launch: Launch) -> list[str]:
        args = super().connection_args(launch)
        # SGLang reads no key from the environment; `--config FILE` merges a YAML file's options (0600 here)
        return args + key_file_args(launch)
