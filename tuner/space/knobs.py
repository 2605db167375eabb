"""Search spaces from YAML: abstract knobs (common.yaml) merged with one engine's flags and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeGuard

from tuner.errors import InputError
from tuner.yamlfile import read_yaml

SPACES_DIR = Path(str(files("tuner") / "search_spaces"))  # package data: works from a wheel too
_SPACE_FILES: dict[str, Path] = {}  # engine -> its YAML, where not SPACES_DIR/<engine>.yaml
KNOB_TYPES = ("int", "float", "categorical", "bool")
_KNOB_FIELDS = {"type", "choices", "low", "high", "log", "step", "default", "group", "when", "doc",
                "flag", "flag_off", "omit", "json_flag", "json_key", "value_from", "option", "option_off",
                "moe_only", "needs_real_weights", "needs", "changes_outputs"}
OUTPUT_CHANGING = "output-changing"  # `--exclude output-changing`: only settings that keep the model's outputs


@dataclass(frozen=True)
class Condition:
    """`knob == value` or `knob != value`: when a knob is active at all."""

    knob: str
    op: str
    value: Any

    def holds(self, config: dict[str, Any]) -> bool:
        actual = config.get(self.knob)
        return (str(actual) == str(self.value)) == (self.op == "==")

    def __str__(self) -> str:
        return f"{self.knob} {self.op} {self.value}"


@dataclass(frozen=True)
class Knob:
    name: str
    type: str
    default: Any
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    group: str = ""
    when: Condition | None = None
    flag: str | list[str] | None = None
    flag_off: str | list[str] | None = None
    omit: tuple[Any, ...] = ()
    json_flag: str | None = None
    json_key: str | None = None
    value_from: str | None = None
    option: str | None = None  # dotted path in the engine's options file, instead of a flag
    option_off: str | None = None  # a false bool sets this options-file section to null
    doc: str = ""
    engine_default: Any = None  # the engine's own default, kept when --fix moves `default`
    moe_only: bool = False  # applies to mixture-of-experts models only (tuner.space.fit.fit_to_model)
    # its effect depends on what the model writes (speculation's acceptance): not tuned on dummy weights
    needs_real_weights: bool = False
    needs: tuple[tuple[Any, tuple[str, ...]], ...] = ()  # (choice, Python modules it imports): preflight
    # settings that change the model's outputs: True for every value but the engine's default, or those values
    changes_outputs: bool | tuple[Any, ...] = False

    def changes_output(self, value: Any) -> bool:
        if self.changes_outputs is True:
            return str(value) != str(self.engine_default)
        if isinstance(self.changes_outputs, bool):  # False: no value does
            return False
        return str(value) in {str(v) for v in self.changes_outputs}

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of an int or float knob."""
        if self.low is None or self.high is None:
            raise ValueError(f"knob {self.name} ({self.type}) has no low/high")
        return self.low, self.high

    @property
    def fixed_value(self) -> Any:
        """The one value a fixed knob can take."""
        return self.choices[0] if self.type in ("categorical", "bool") else self.low

    @property
    def fixed(self) -> bool:
        if self.type == "categorical":
            return len(self.choices) <= 1
        if self.type in ("int", "float"):
            return self.low == self.high
        return False

    def coerce(self, raw: Any, where: str) -> Any:
        """A user-given value (from --fix or YAML) in this knob's type and range."""
        try:
            if self.type == "bool":
                if isinstance(raw, bool):
                    return raw
                text = str(raw).strip().lower()
                if text in ("1", "true", "on", "yes"):
                    return True
                if text in ("0", "false", "off", "no"):
                    return False
                raise ValueError
            value: float
            if self.type == "int":
                value = int(str(raw))
            elif self.type == "float":
                value = float(str(raw))
                if not math.isfinite(value):
                    raise ValueError
            else:
                matches = [c for c in self.choices if str(c) == str(raw)]
                if not matches:
                    raise InputError(f"{raw!r} is not one of {list(self.choices)}", file=where, field=self.name)
                return matches[0]
        except ValueError:
            raise InputError(f"{raw!r} is not a valid {self.type}", file=where, field=self.name) from None
        low, high = self.bounds
        if not (low <= value <= high):
            raise InputError(f"{value} is outside [{self.low}, {self.high}]", file=where, field=self.name)
        return value


@dataclass
class SearchSpace:
    engine: str
    knobs: dict[str, Knob]
    source: str
    notes: list[str] = field(default_factory=list)
    # (knob, str(value)) -> why it cannot run here: dropped for the rest of a study (tuner.space.fit)
    unavailable: dict[tuple[str, str], str] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        """The engine's own defaults, for the knobs active under them (trial 0, the baseline)."""
        return self.active_config({name: knob.default for name, knob in self.knobs.items()})

    def active_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Only the knobs whose condition holds."""
        return {name: config[name] for name, knob in self.knobs.items()
                if name in config and (knob.when is None or knob.when.holds(config))}

    def fix(self, name: str, raw: Any, where: str = "--fix") -> None:
        knob = self._knob(name, where)
        value = knob.coerce(raw, where)
        self.knobs[name] = replace(knob, default=value, choices=(value,) if knob.type == "categorical" else (),
                                   low=value if knob.type in ("int", "float") else knob.low,
                                   high=value if knob.type in ("int", "float") else knob.high,
                                   type="categorical" if knob.type == "bool" else knob.type)
        if knob.type == "bool":
            self.knobs[name] = replace(self.knobs[name], choices=(value,))

    def exclude(self, group_or_knob: str, where: str = "--exclude") -> None:
        if group_or_knob == OUTPUT_CHANGING:
            self._keep_outputs()
            return
        names = [n for n, k in self.knobs.items() if k.group == group_or_knob] or [group_or_knob]
        for name in names:
            knob = self._knob(name, where)
            self.fix(name, knob.default, where)

    def _keep_outputs(self) -> None:
        """Every output-changing knob held at the values that keep the outputs (the engine's default)."""
        for name, knob in list(self.knobs.items()):
            if knob.changes_outputs is True:
                self.fix(name, knob.engine_default, f"--exclude {OUTPUT_CHANGING}")
            elif knob.changes_outputs:
                kept = tuple(c for c in knob.choices if not knob.changes_output(c))
                self.knobs[name] = replace(knob, choices=kept, type="categorical",
                                           default=knob.default if knob.default in kept else knob.engine_default)

    def _knob(self, name: str, where: str) -> Knob:
        if name not in self.knobs:
            groups = sorted({k.group for k in self.knobs.values() if k.group})
            raise InputError(f"unknown knob or group '{name}' for engine {self.engine} "
                             f"(knobs: {', '.join(self.knobs)}; groups: {', '.join(groups)}, {OUTPUT_CHANGING})",
                             file=where)
        return self.knobs[name]


def _read_yaml(path: Path) -> dict:
    _, data = read_yaml(path, "search space")
    if not isinstance(data, dict) or not isinstance(data.get("knobs"), dict):
        raise InputError("expected a mapping with a 'knobs' mapping", file=str(path), field="knobs")
    return data


def _parse_condition(text: Any, path: Path, name: str) -> Condition | None:
    if text is None:
        return None
    for op in ("==", "!="):
        if isinstance(text, str) and op in text:
            knob, value = (part.strip() for part in text.split(op, 1))
            return Condition(knob, op, value)
    raise InputError(f"condition must read 'knob == value' or 'knob != value', got {text!r}",
                     file=str(path), field=f"knobs.{name}.when")


def _is_number(value: Any, integer: bool = False) -> TypeGuard[float]:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return math.isfinite(value)


def _check_field_types(spec: dict, path: Path, where: str) -> None:
    """Each field in the type the rest of the code relies on (`flag` a string or list of strings...)."""
    def wrong(key: str, expected: str) -> InputError:
        return InputError(f"must be {expected}, got {spec[key]!r}", file=str(path), field=f"{where}.{key}")

    for key in ("group", "doc", "json_flag", "json_key", "value_from"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise wrong(key, "a string")
    for key in ("option", "option_off"):
        if spec.get(key) is not None and not (isinstance(spec[key], str) and all(spec[key].split("."))):
            raise wrong(key, "a dotted path such as kv_cache_config.dtype")
    if (spec.get("option") or spec.get("option_off")) and any(spec.get(k) for k in ("flag", "flag_off", "json_flag")):
        raise InputError("a knob maps to flags or to an option, not both", file=str(path), field=where)
    if spec.get("option_off") and spec.get("type") != "bool":
        raise InputError("option_off is for bool knobs", file=str(path), field=f"{where}.option_off")
    for key in ("flag", "flag_off"):
        value = spec.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise wrong(key, "a flag or a list of flags")
    for key in ("choices", "omit"):
        value = spec.get(key)
        if value is not None and not (isinstance(value, list) and all(
                isinstance(v, (str, bool, type(None))) or _is_number(v) for v in value)):
            raise wrong(key, "a list of plain values (strings, numbers, booleans)")
    if spec.get("log") is not None and not isinstance(spec["log"], bool):
        raise wrong("log", "true or false")
    if spec.get("step") is not None and not (_is_number(spec["step"], spec.get("type") == "int") and spec["step"] > 0):
        raise wrong("step", "a positive integer" if spec.get("type") == "int" else "a positive number")
    default = spec.get("default")
    if not isinstance(default, (str, bool, type(None))) and not _is_number(default):
        raise wrong("default", "a plain value (string, number, boolean)")
    for flag in ("moe_only", "needs_real_weights"):
        if spec.get(flag) is not None and not isinstance(spec[flag], bool):
            raise wrong(flag, "true or false")
    needs = spec.get("needs")
    if needs is not None and not (isinstance(needs, dict) and all(
            isinstance(modules, list) and modules and all(
                isinstance(m, str) and all(part.isidentifier() for part in m.split(".")) for m in modules)
            for modules in needs.values())):
        raise wrong("needs", "a mapping of choice to a list of Python modules, e.g. {fp8: [compressed_tensors]}")
    changes = spec.get("changes_outputs")
    if changes is not None and not isinstance(changes, bool) and not (
            isinstance(changes, list) and all(isinstance(v, (str, bool)) or _is_number(v) for v in changes)):
        raise wrong("changes_outputs", "true, false or a list of the values that change the outputs")


def _build_knob(name: str, spec: dict, path: Path) -> Knob:
    where = f"knobs.{name}"
    if not isinstance(name, str):
        raise InputError(f"knob names are strings, got {name!r}", file=str(path), field=where)
    unknown = set(spec) - _KNOB_FIELDS
    if unknown:
        raise InputError(f"unknown key '{sorted(unknown)[0]}'", file=str(path), field=where)
    _check_field_types(spec, path, where)
    kind = spec.get("type")
    if kind not in KNOB_TYPES:
        raise InputError(f"type must be one of {', '.join(KNOB_TYPES)}, got {kind!r}", file=str(path),
                         field=f"{where}.type")
    choices = tuple(spec.get("choices") or ())
    if kind == "bool":
        choices = (False, True)
    if kind == "categorical" and not choices:
        raise InputError("a categorical knob needs 'choices'", file=str(path), field=f"{where}.choices")
    low, high = spec.get("low"), spec.get("high")
    if kind in ("int", "float"):
        integer = kind == "int"
        if not _is_number(low, integer) or not _is_number(high, integer) or low > high:
            raise InputError(f"needs {'integer' if integer else 'numeric'} 'low' <= 'high'", file=str(path),
                             field=f"{where}.low")
        if spec.get("log") and low <= 0:
            raise InputError("a log-scaled knob needs low > 0", file=str(path), field=f"{where}.log")
    if "default" not in spec:
        raise InputError("missing 'default'", file=str(path), field=f"{where}.default")
    marks = spec.get("changes_outputs")
    changes_outputs: bool | tuple[Any, ...] = marks if isinstance(marks, bool) else tuple(marks or ()) or False
    knob = Knob(name=name, type=kind, default=spec["default"], choices=choices, low=low, high=high,
                log=bool(spec.get("log", False)), step=spec.get("step"), group=spec.get("group", ""),
                when=_parse_condition(spec.get("when"), path, name), flag=spec.get("flag"),
                flag_off=spec.get("flag_off"), omit=tuple(spec.get("omit") or ()),
                json_flag=spec.get("json_flag"), json_key=spec.get("json_key"),
                value_from=spec.get("value_from"), option=spec.get("option"), option_off=spec.get("option_off"),
                doc=spec.get("doc", ""), engine_default=spec["default"], moe_only=bool(spec.get("moe_only")),
                needs_real_weights=bool(spec.get("needs_real_weights")),
                needs=tuple((value, tuple(modules)) for value, modules in (spec.get("needs") or {}).items()),
                changes_outputs=changes_outputs)
    # the engine's default may lie outside the searched range (trial 0 runs it anyway), not its type
    if kind == "bool" and not isinstance(knob.default, bool):
        raise InputError("default must be true or false", file=str(path), field=f"{where}.default")
    if kind in ("int", "float") and (isinstance(knob.default, bool) or not isinstance(knob.default, (int, float))):
        raise InputError(f"default {knob.default!r} is not a number", file=str(path), field=f"{where}.default")
    named = [value for value, _ in knob.needs] + list(knob.changes_outputs if isinstance(knob.changes_outputs, tuple)
                                                       else ())
    for value in named:  # what `needs` and `changes_outputs` name must be values of the knob
        if kind in ("categorical", "bool") and str(value) not in {str(c) for c in choices}:
            raise InputError(f"{value!r} is not one of {list(choices)}", file=str(path), field=where)
    return knob


def register_space(engine: str, path: str | Path) -> None:
    """Where an engine's search space lives when it is not a shipped YAML (an adapter's `space_file`)."""
    _SPACE_FILES[engine] = Path(path)


def load_space(engine_or_path: str) -> SearchSpace:
    """An engine's name (its shipped or registered YAML) or a path to a user's YAML with `engine:` and `extends:`."""
    path = Path(engine_or_path)
    if not path.suffix:
        path = _SPACE_FILES.get(engine_or_path, SPACES_DIR / f"{engine_or_path}.yaml")
        if not path.exists():
            raise InputError(f"no search space for engine '{engine_or_path}'", field="engine")
    data = _read_yaml(path)
    engine = data.get("engine")
    if not isinstance(engine, str):
        raise InputError("missing 'engine' (the adapter's name)", file=str(path), field="engine")
    merged: dict[str, dict] = {}
    if data.get("extends"):
        if not isinstance(data["extends"], str):
            raise InputError(f"must be a file name such as common.yaml, got {data['extends']!r}", file=str(path),
                             field="extends")
        base_path = (path.parent / data["extends"]).resolve()
        if not base_path.exists():
            base_path = SPACES_DIR / data["extends"]
        base = _read_yaml(base_path)
        merged = {name: dict(spec or {}) for name, spec in base["knobs"].items()}
    for name, spec in data["knobs"].items():
        if spec is not None and not isinstance(spec, dict):
            raise InputError("each knob must be a mapping", file=str(path), field=f"knobs.{name}")
        merged.setdefault(name, {}).update(spec or {})
    # an engine file lists what it supports: knobs of the base it does not mention are dropped
    knobs = {name: _build_knob(name, merged[name], path) for name in data["knobs"]}
    for knob in knobs.values():
        if knob.when and knob.when.knob not in knobs:
            raise InputError(f"condition names unknown knob '{knob.when.knob}'", file=str(path),
                             field=f"knobs.{knob.name}.when")
    return SearchSpace(engine=engine, knobs=knobs, source=str(path))
