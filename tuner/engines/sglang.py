"""SGLang: `python -m sglang.launch_server`, launched as a process."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.engines.base import Engine, FailureClass, Launch, patterns


@dataclass
class SglangEngine(Engine):
    name: str = "sglang"
    package: str = "sglang"
    metrics_prefix: str = "sglang:"
    failure_patterns: list = field(default_factory=lambda: patterns(
        (FailureClass.OOM_STARTUP, r"Not enough memory\. Please try to increase --mem-fraction-static|"
                                   r"Capture cuda graph failed"),
        (FailureClass.OOM_LOAD, r"OutOfMemoryError|CUDA out of memory"),
        (FailureClass.UNSUPPORTED, r"(Error|Exception): .*(\bnot supported\b|\bunsupported\b|is not valid for this configuration)"),
        (FailureClass.INVALID_CONFIG, r"error: (argument|unrecognized|ambiguous option)|invalid choice"),
    ))

    def program(self, launch: Launch) -> list[str]:
        return [launch.python, "-m", "sglang.launch_server"]

    def display_program(self) -> list[str]:
        return ["python", "-m", "sglang.launch_server"]

    def model_args(self, launch: Launch) -> list[str]:
        return ["--model-path", launch.model, "--enable-metrics",
                *(["--context-length", str(launch.max_model_len)] if launch.max_model_len else []),
                *(["--load-format", "dummy"] if launch.dummy_weights else [])]

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        names = {"spec_accept_rate": "spec_decode_acceptance_rate", "spec_accept_length": "spec_decode_mean_accepted_length",
                 "cache_hit_rate": "prefix_cache_hit_rate"}
        return {common: values[own] for own, common in names.items() if own in values}

    def help_argv(self, python: str) -> list[str]:
        return [python, "-m", "sglang.launch_server", "--help"]

    def connection_args(self, launch: Launch) -> list[str]:
        args = super().connection_args(launch)
        return args + (["--api-key", launch.api_key] if launch.api_key else [])
