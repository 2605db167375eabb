"""A space that fits the model and the engine's install, before anything launches.

- `fit_to_model`: knobs marked `moe_only` leave the space of a dense model.
- `fit_to_weights`: knobs marked `needs_real_weights` leave the space when the weights are dummy.
- `preflight`: choices whose Python modules (`needs`) the engine's interpreter cannot import leave the
  space; one subprocess of that interpreter checks them all with importlib.util.find_spec (no import of
  the engine, no server).
- `drop_for_study`: after a trial failed with `environment` (a module missing at start), the settings that
  need that module are not proposed again in the study.
- `output_changes`: which settings of a configuration change the model's outputs (`changes_outputs`).

Each returns its reasons, one line each, for the caller to print; they are also kept in `space.notes`.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuner.models.shapes import ModelShape
from tuner.space.knobs import SearchSpace

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def num_experts(model: ModelShape | Mapping[str, Any] | str | Path) -> int | None:
    """Experts per MoE layer: from a shape, a config.json mapping, or a local model folder (None: unknown,
    e.g. a hub id that was not downloaded)."""
    if isinstance(model, ModelShape):
        return model.num_experts
    if isinstance(model, (str, Path)):
        path = Path(model)
        path = path / "config.json" if path.is_dir() else path
        if path.name != "config.json" or not path.is_file():
            return None
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        config = dict(loaded)
    else:
        config = dict(model)
    config.update(config.get("text_config") or {})  # multimodal models keep the language model's here
    return max((int(config[k]) for k in EXPERT_KEYS if isinstance(config.get(k), int)), default=0)


def _drop_knob(space: SearchSpace, name: str, reason: str) -> list[str]:
    notes = [f"knob '{name}' dropped: {reason}"]
    del space.knobs[name]
    for other, knob in list(space.knobs.items()):
        if knob.when is not None and knob.when.knob == name:
            notes += _drop_knob(space, other, f"it depends on dropped '{name}'")
    return notes


def _drop_marked(space: SearchSpace, names: list[str], reason: str) -> list[str]:
    """Drop the knobs `names` (and those that depend on them) for `reason`; the notes are kept in the space."""
    notes: list[str] = []
    for name in names:
        if name in space.knobs:  # an earlier one's dependants may have taken it already
            notes += _drop_knob(space, name, reason)
    space.notes.extend(notes)
    return notes


def fit_to_model(space: SearchSpace, model: ModelShape | Mapping[str, Any] | str | Path) -> list[str]:
    """Remove the `moe_only` knobs when the model is dense; returns the reasons."""
    experts = num_experts(model)
    if experts is None or experts > 0:
        return []
    return _drop_marked(space, [n for n, k in space.knobs.items() if k.moe_only],
                        "the model is dense (no experts); it applies to mixture-of-experts models")


def fit_to_weights(space: SearchSpace, dummy: bool) -> list[str]:
    """Remove the `needs_real_weights` knobs when the trials serve dummy weights; returns the reasons."""
    if not dummy:
        return []
    return _drop_marked(space, [n for n, k in space.knobs.items() if k.needs_real_weights],
                        "the weights are dummy: what it gains depends on what a real model writes "
                        "(speculation's acceptance)")


_CHECK = ("import importlib.util, json, sys\n"
          "def found(name):\n"
          "    try:\n"
          "        return importlib.util.find_spec(name) is not None\n"
          "    except (ImportError, ValueError):\n"
          "        return False\n"
          "print(json.dumps({name: found(name) for name in sys.argv[1:]}))\n")


def importable(python: str, modules: list[str], timeout_s: float = 120) -> dict[str, bool]:
    """Which modules `python` can import, asked of that interpreter once (find_spec: nothing is run)."""
    if not modules:
        return {}
    out = subprocess.run([python, "-c", _CHECK, *modules], capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{python} could not check its modules: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def preflight(space: SearchSpace, python: str) -> list[str]:
    """Drop the choices whose modules `python` cannot import (never the engine's default, which the
    baseline runs as is); returns the reasons."""
    modules = sorted({m for knob in space.knobs.values() for _, needed in knob.needs for m in needed})
    try:
        found = importable(python, modules)
    except (OSError, subprocess.TimeoutExpired, RuntimeError, ValueError) as exc:
        note = f"library preflight skipped: {exc}"
        space.notes.append(note)
        return [note]
    notes = []
    for name, knob in list(space.knobs.items()):
        missing = {str(value): [m for m in needed if not found.get(m, True)] for value, needed in knob.needs}
        dropped = [c for c in knob.choices if missing.get(str(c)) and str(c) != str(knob.engine_default)]
        if not dropped:
            continue
        kept = tuple(c for c in knob.choices if c not in dropped)
        space.knobs[name] = replace(knob, choices=kept, type="categorical",
                                    default=knob.default if knob.default in kept else knob.engine_default)
        notes += [f"{name}={value} dropped: {python} cannot import {', '.join(missing[str(value)])}"
                  for value in dropped]
    space.notes.extend(notes)
    return notes


def drop_for_study(space: SearchSpace, config: Mapping[str, Any], module: str | None) -> list[str]:
    """After an `environment` failure of `config` (`module` missing): the settings of `config` that need
    that module are not proposed again. The Optuna distributions stay as they are (Optuna refuses a
    categorical whose choices change within a study); `space.unavailable` holds them, and
    `unavailable_in` names them in a configuration, for the caller to reject it before it launches."""
    if not module:
        return []
    notes = []
    for name, knob in space.knobs.items():
        for value, needed in knob.needs:
            if (name in config and str(config[name]) == str(value)
                    and any(module == m or module.startswith(m + ".") or m.startswith(module + ".") for m in needed)):
                reason = f"the engine's Python cannot import {module}"
                space.unavailable[(name, str(value))] = reason
                notes.append(f"{name}={value} is not proposed again: {reason}")
    space.notes.extend(notes)
    return notes


def unavailable_in(space: SearchSpace, config: Mapping[str, Any]) -> list[str]:
    """Reasons why `config` cannot run here (settings dropped by `drop_for_study`)."""
    return [f"{name}={config[name]}: {space.unavailable[(name, str(config[name]))]}"
            for name in config if (name, str(config[name])) in space.unavailable]


def output_changes(space: SearchSpace, config: Mapping[str, Any]) -> list[str]:
    """The settings of `config` that change the model's outputs, e.g. ['quantization=fp8'] (empty: none)."""
    active = space.active_config(dict(config))
    return [f"{name}={value}" for name, value in active.items()
            if name in space.knobs and space.knobs[name].changes_output(value)]
