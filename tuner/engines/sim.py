"""The simulated engine: `tune sim-serve`, a performance model of a GPU behind a real HTTP server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tuner.engines.base import Engine, Launch, patterns
from tuner.engines.registry import register_engine
from tuner.models.shapes import get_shape
from tuner.outcome import Outcome
from tuner.simulator.cli import API_KEY_ENV


@register_engine("sim")
@dataclass
class SimEngine(Engine):
    simulated: ClassVar[bool] = True
    needs_gpu: ClassVar[bool] = False
    default_gpu: ClassVar[str] = "h100"
    model_flag: ClassVar[str] = "--model-shape"
    name: str = "sim"
    metrics_prefix: str = "sim:"
    failure_patterns: list = field(default_factory=lambda: patterns(
        (Outcome.OOM_LOAD, r"out of memory under load"),
        (Outcome.OOM_STARTUP, r"No available memory for the cache blocks|To serve at least one request with "
                              r"the model's max seq len|out of memory"),
        (Outcome.INVALID_CONFIG, r"must be greater than or equal to|must be divisible by|is smaller than "
                                 r"max_model_len|is greater than the derived max_model_len|error: argument"),
        (Outcome.UNSUPPORTED,
         r"(Error|Exception): .*(\bnot supported\b|\bunsupported\b|is not valid for this configuration)"),
    ))

    def program(self, launch: Launch) -> list[str]:
        return [launch.python, "-m", "tuner", "sim-serve"]

    def display_program(self) -> list[str]:
        return ["tune", "sim-serve"]

    def model_args(self, launch: Launch) -> list[str]:
        get_shape(launch.model)  # fails early, with the known names, on a wrong shape
        return [self.model_flag, launch.model, "--gpu", launch.gpu, "--time-scale", f"{launch.time_scale:g}",
                *(["--max-model-len", str(launch.max_model_len)] if launch.max_model_len else [])]

    def clock_scale(self, launch: Launch) -> float:
        return launch.time_scale

    def environment(self, launch: Launch) -> dict[str, str]:
        env = super().environment(launch)
        if launch.api_key:
            env[API_KEY_ENV] = launch.api_key  # not on argv, where `ps` would show it
        return env

    def version(self, python: str = "") -> str:
        from tuner import __version__
        return f"servetune-sim {__version__}"
