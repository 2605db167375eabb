"""Engine adapters by name. Each lives in its own module, knows one engine only and registers itself."""

from __future__ import annotations

from tuner.engines.base import Engine
from tuner.engines.registry import engine_names, get_engine, is_simulated, needs_gpu, register_engine

# the built-in adapters register themselves, in this order (the first simulated one is the default)
# isort: off
from tuner.engines import sim  # noqa: E402,F401
from tuner.engines import vllm  # noqa: E402,F401
from tuner.engines import sglang  # noqa: E402,F401
from tuner.engines import trtllm  # noqa: E402,F401
# isort: on

__all__ = ["Engine", "engine_names", "get_engine", "is_simulated", "needs_gpu", "register_engine"]
