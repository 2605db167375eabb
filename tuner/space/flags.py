"""Knob values <-> command-line flags and options-file settings, by each knob's mapping in the engine YAML."""

from __future__ import annotations

import json
from typing import Any

from tuner.space.knobs import Knob, SearchSpace


def _as_list(flag: str | list[str] | None) -> list[str]:
    if flag is None:
        return []
    return [flag] if isinstance(flag, str) else [str(part) for part in flag]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_flags(space: SearchSpace, config: dict[str, Any], baseline: bool = False) -> list[str]:
    """The engine flags for `config`. A baseline renders only knobs moved off the engine's default."""
    argv: list[str] = []
    json_groups: dict[str, dict[str, Any]] = {}
    active = space.active_config(config)
    for name, value in active.items():
        knob = space.knobs[name]
        if _is_option(knob) or (baseline and value == knob.engine_default):
            continue
        if value in knob.omit:
            if knob.json_flag:
                json_groups.setdefault(knob.json_flag, {})["__omitted__"] = True
            continue
        if knob.json_flag:
            json_groups.setdefault(knob.json_flag, {})[knob.json_key or name] = value
        elif knob.type == "bool" or isinstance(value, bool):
            if value:
                argv += _as_list(knob.flag)
                if knob.value_from and knob.flag:
                    argv.append(_format(active.get(knob.value_from)))
            else:
                argv += _as_list(knob.flag_off)
        elif knob.flag:
            argv += [*_as_list(knob.flag), _format(value)]
    for flag, payload in json_groups.items():
        if payload.pop("__omitted__", False):
            continue
        argv += [flag, json.dumps(payload, separators=(",", ":"), sort_keys=True)]
    return argv


def _is_option(knob: Knob) -> bool:
    return bool(knob.option or knob.option_off)


def _put(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set tree[a][b][c] for path "a.b.c". A section set to null (off) keeps nothing under it."""
    *parents, leaf = path.split(".")
    for key in parents:
        if key in tree and not isinstance(tree[key], dict):
            return
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def render_options(space: SearchSpace, config: dict[str, Any], baseline: bool = False) -> dict[str, Any]:
    """The options-file settings for `config`: each `option:` knob's value at its dotted path, nested.
    A false bool with `option_off` sets that section to null. Baseline and `omit` as in render_flags."""
    tree: dict[str, Any] = {}
    for name, value in space.active_config(config).items():
        knob = space.knobs[name]
        if not _is_option(knob) or (baseline and value == knob.engine_default) or value in knob.omit:
            continue
        if value is False and knob.option_off:
            _put(tree, knob.option_off, None)
        elif knob.option:
            _put(tree, knob.option, value)
    return tree


def _silent_value(knob: Knob) -> Any:
    """The value for which render_flags emits nothing, if there is one."""
    if knob.omit:
        return knob.omit[0]
    if knob.type == "bool" and knob.flag_off is None:
        return False
    if knob.type == "bool" and knob.flag is None:
        return True
    return None


def parse_flags(space: SearchSpace, argv: list[str]) -> dict[str, Any]:
    """Inverse of render_flags (non-baseline): the active configuration a command line encodes
    (knobs that live in the options file are not on it)."""
    config: dict[str, Any] = {name: _silent_value(knob) for name, knob in space.knobs.items()
                              if _silent_value(knob) is not None and not _is_option(knob)}
    by_flag: dict[tuple[str, ...], tuple[Knob, bool]] = {}
    json_knobs: dict[str, list[Knob]] = {}
    for knob in space.knobs.values():
        if knob.json_flag:
            json_knobs.setdefault(knob.json_flag, []).append(knob)
            continue
        if knob.flag:
            by_flag[tuple(_as_list(knob.flag))] = (knob, True)
        if knob.flag_off:
            by_flag[tuple(_as_list(knob.flag_off))] = (knob, False)
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in json_knobs:
            payload = json.loads(argv[i + 1])
            for knob in json_knobs[token]:
                if (knob.json_key or knob.name) in payload:
                    config[knob.name] = payload[knob.json_key or knob.name]
            i += 2
            continue
        for key, (knob, truth) in by_flag.items():
            if tuple(argv[i:i + len(key)]) == key:
                i += len(key)
                if knob.type == "bool":
                    config[knob.name] = truth
                    if truth and knob.value_from:
                        i += 1
                else:
                    config[knob.name] = knob.coerce(argv[i], "argv")
                    i += 1
                break
        else:
            i += 1
    return space.active_config(config)
