"""Valid flag combinations the real engine refuses to start, per engine version, with its message.

Each rule was read from a real failure log (the `source` column); the simulator refuses the same
configurations at start-up with the same root-cause line, so a tuner learns the same failing region.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tuner.simulator.config import EngineStartupError, SimConfig, check_engine_config


@dataclass(frozen=True)
class Unsupported:
    engine: str
    versions: tuple[str, str]  # first and last version seen failing, inclusive ("" = open)
    applies: Callable[[SimConfig], bool]
    message: str
    source: str


RULES = (
    Unsupported("vllm", ("0.26.0", ""),
                lambda c: c.attention_backend == "FLEX_ATTENTION" and c.kv_cache_dtype != "auto",
                "ValueError: Selected backend AttentionBackendEnum.FLEX_ATTENTION is not valid for this "
                "configuration. Reason: ['kv_cache_dtype not supported']",
                "tests/fixtures/vllm/fail-unsupported-flex-fp8-h100.log; experiments/h100-vllm trials 3, 6"),
)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _in_range(version: str | None, first: str, last: str) -> bool:
    if version is None:  # unknown version: the newest, as the rules are open-ended upwards
        return last == ""
    v = _version(version)
    return (not first or v >= _version(first)) and (not last or v <= _version(last))


def check_supported(config: SimConfig) -> None:
    """Raise `EngineStartupError` with the engine's own message when a rule says it cannot start."""
    for rule in RULES:
        if rule.engine == config.engine and _in_range(config.engine_version, *rule.versions) and rule.applies(config):
            raise EngineStartupError(rule.message)


def check_engine(config: SimConfig) -> None:
    """Everything the simulated engine checks before it starts: the version's refused combinations, then
    vLLM's config-time validation (`EngineStartupError` with the engine's message)."""
    check_supported(config)
    check_engine_config(config)
