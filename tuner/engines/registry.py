"""Engine adapters by name: `@register_engine("vllm")` on an adapter class is all a new engine needs
(with its search space, `tuner/search_spaces/<name>.yaml` or the adapter's `space_file`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tuner.engines.base import Engine
from tuner.errors import InputError
from tuner.space.knobs import register_space

_ADAPTERS: dict[str, type[Engine]] = {}


def register_engine(name: str) -> Callable[[type[Engine]], type[Engine]]:
    def register(cls: type[Engine]) -> type[Engine]:
        if cls().name != name:
            raise ValueError(f"adapter {cls.__name__} names itself '{cls().name}', registered as '{name}'")
        _ADAPTERS[name] = cls
        if cls.space_file:
            register_space(name, cls.space_file)
        return cls
    return register


def engine_names() -> list[str]:
    return list(_ADAPTERS)


def get_engine(name: str) -> Engine:
    if name not in _ADAPTERS:
        raise InputError(f"unknown engine '{name}'; known: {', '.join(_ADAPTERS)}", field="engine")
    return _ADAPTERS[name]()


def is_simulated(names: Iterable[str]) -> bool:
    """Every engine named is a simulator (unknown names, e.g. in an old store, are not)."""
    names = list(names)
    return bool(names) and all(n in _ADAPTERS and _ADAPTERS[n].simulated for n in names)


def needs_gpu(names: Iterable[str]) -> bool:
    return any(n not in _ADAPTERS or _ADAPTERS[n].needs_gpu for n in names)
