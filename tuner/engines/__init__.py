"""Engine adapters by name. Each lives in its own module and knows one engine only."""

from __future__ import annotations

import importlib

from tuner.engines.base import Engine
from tuner.errors import InputError

ADAPTERS = {
    "sim": ("tuner.engines.sim", "SimEngine"),
    "vllm": ("tuner.engines.vllm", "VllmEngine"),
    "sglang": ("tuner.engines.sglang", "SglangEngine"),
    "trtllm": ("tuner.engines.trtllm", "TrtllmEngine"),
}


def get_engine(name: str) -> Engine:
    if name not in ADAPTERS:
        raise InputError(f"unknown engine '{name}'; known: {', '.join(ADAPTERS)}", field="engine")
    module, cls = ADAPTERS[name]
    return getattr(importlib.import_module(module), cls)()
