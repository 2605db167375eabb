"""The simulated engine's scheduler by the engine it plays: vLLM's (`engine.SimScheduler`) or SGLang's
prefill-first one (`sglang_scheduler.SglangEngine`)."""

from __future__ import annotations

from tuner.simulator.config import SimConfig
from tuner.simulator.engine import SimScheduler
from tuner.simulator.sglang_scheduler import SglangEngine


def make_engine(config: SimConfig, replica: int = 0) -> SimScheduler:
    """The engine whose scheduler `config.engine` names."""
    if config.engine == "sglang":
        return SglangEngine(config, replica=replica)
    return SimScheduler(config, replica=replica)
