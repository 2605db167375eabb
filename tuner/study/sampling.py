"""Turn an Optuna trial into an engine configuration, knob by knob, honouring conditions."""

from __future__ import annotations

from typing import Any

import optuna

from tuner.space.knobs import Knob, SearchSpace


def _suggest(trial: optuna.Trial, name: str, knob: Knob) -> Any:
    if knob.type in ("categorical", "bool"):
        return trial.suggest_categorical(name, list(knob.choices))
    low, high = knob.bounds
    if knob.type == "int":
        if knob.log:
            return trial.suggest_int(name, int(low), int(high), log=True)
        return trial.suggest_int(name, int(low), int(high), step=int(knob.step or 1))
    if knob.log:
        return trial.suggest_float(name, low, high, log=True)
    value = trial.suggest_float(name, low, high, step=knob.step)
    return round(value, 6) if knob.step else value  # 0.88, not 0.8799999999999999


def param_name(engine: str, knob: str, several_engines: bool) -> str:
    return f"{engine}.{knob}" if several_engines else knob


def suggest_config(trial: optuna.Trial, spaces: dict[str, SearchSpace],
                   baseline: bool = False) -> tuple[str, dict[str, Any]]:
    """The engine and knob values of this trial; the baseline takes the engine's defaults, unsampled
    (they may lie outside the searched ranges)."""
    several = len(spaces) > 1
    engine = trial.suggest_categorical("engine", list(spaces)) if several else next(iter(spaces))
    space = spaces[engine]
    if baseline:
        return engine, space.defaults()
    config: dict[str, Any] = {}
    for name, knob in space.knobs.items():
        if knob.when is not None and not knob.when.holds(config):
            continue
        if knob.fixed:
            config[name] = knob.fixed_value
        else:
            config[name] = _suggest(trial, param_name(engine, name, several), knob)
    return engine, config


def baseline_params(spaces: dict[str, SearchSpace], engine: str) -> dict[str, Any]:
    """What to enqueue for an engine's defaults: only the engine; its knobs are the defaults (suggest_config)."""
    return {"engine": engine} if len(spaces) > 1 else {}


def every_engines_defaults(spaces: dict[str, SearchSpace]) -> list[dict[str, Any]]:
    """The first trials of a new study, in the order the engines were given: each engine's defaults, so that a
    study of several engines measures where each starts (the first engine's are the study's baseline)."""
    return [baseline_params(spaces, engine) for engine in spaces]
