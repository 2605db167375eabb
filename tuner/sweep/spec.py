"""A sweep spec: one YAML file naming a matrix of models × workloads × engines × GPUs, one study per cell.

    name: nightly-sim
    trials: 6                       # per study, the defaults baseline included
    slo: ttft_p99=30s,tpot_p99=200ms
    matrix:
      model_shapes: [llama-3.2-1b, llama-3.1-8b]   # and/or models: [meta-llama/Llama-3.1-8B-Instruct]
      workloads:
        - {path: workloads/mooncake_conversation_head300.jsonl, rows: 24, time_scale: 3}
      engines: [sim]
      gpu: [h100]                   # GPU kinds
      gpus: [1]                     # GPU counts

Relative workload paths are read from the current directory (the repository root in CI).
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuner.engines import engine_names, get_engine
from tuner.errors import InputError
from tuner.hardware.gpus import get_gpu
from tuner.loadgen.slo import SLO, parse_slo
from tuner.models.shapes import get_shape
from tuner.records.objectives import Objectives
from tuner.yamlfile import read_yaml

TOP_KEYS = {"name", "description", "trials", "slo", "latency", "sim_time_scale", "sampler", "seed",
            "engine_python", "engine_args", "mlflow_uri", "repeats", "noise_threshold", "noise_floor", "matrix"}
MATRIX_KEYS = {"model_shapes", "models", "workloads", "engines", "gpu", "gpus"}
WORKLOAD_KEYS = {"path", "name", "rows", "seconds", "time_scale", "format"}
SAMPLERS = ("tpe", "nsga2", "random", "grid")


@dataclass(frozen=True)
class WorkloadSpec:
    path: Path
    name: str
    rows: int | None = None
    seconds: float | None = None
    time_scale: float = 1.0
    format: str | None = None


@dataclass(frozen=True)
class Cell:
    model: str  # a preset shape name (dummy weights) or a model path / hub id
    shaped: bool
    workload: WorkloadSpec
    engine: str
    gpu: str | None  # GPU kind; None: whatever the machine has
    gpus: int

    @property
    def id(self) -> str:
        text = f"{Path(self.model).name}-{self.workload.name}-{self.engine}-{self.gpu or 'gpu'}-x{self.gpus}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path
    cells: list[Cell]
    trials: int = 6
    slo: SLO | None = None
    objectives: Objectives | None = field(default_factory=Objectives)  # None: the tuner's default_objectives
    sim_time_scale: float = 10.0
    sampler: str = "tpe"
    seed: int | None = 1
    engine_python: str = sys.executable
    engine_args: list[str] = field(default_factory=list)
    mlflow_uri: str | None = ""  # "": a SQLite store in the work folder; None: no MLflow
    repeats: int = 0
    noise_threshold: float = 0.10  # relative change treated as noise when no repeats taught better
    noise_floor: float = 0.01  # a learned threshold is never below this


class _Located:
    """Line numbers of the spec's keys, for one-line errors that point at the right place."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        try:
            self.root = yaml.compose(text)
        except yaml.YAMLError:
            self.root = None

    def line(self, key: str) -> int | None:
        """The line of `key` (`matrix.workloads[0].rows`), or of the nearest enclosing key found."""
        node, found = self.root, None
        for part in re.findall(r"[^.\[\]]+", key):
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
                node = node.value[int(part)]
            else:
                node = None
            if node is None:
                break
            found = node
        return None if found is None else found.start_mark.line + 1

    def error(self, message: str, key: str) -> InputError:
        return InputError(message, file=str(self.path), line=self.line(key), field=key)


def _list(value: Any, key: str, where: _Located) -> list:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise where.error("must not be empty", key)
    return items


def _number(value: Any, key: str, where: _Located, kind: type, minimum: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise where.error(f"must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    if value < minimum:
        raise where.error(f"must be at least {minimum:g}, got {value!r}", key)
    return kind(value)


def _workload(item: Any, key: str, where: _Located) -> WorkloadSpec:
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        raise where.error("each workload is a path or a mapping with 'path'", key)
    for name in item:
        if name not in WORKLOAD_KEYS:
            raise where.error(f"unknown key (known: {', '.join(sorted(WORKLOAD_KEYS))})", f"{key}.{name}")
    if not isinstance(item.get("path"), str):
        raise where.error("missing workload path", f"{key}.path")
    path = Path(item["path"])
    if not path.is_file():
        raise where.error(f"no such file: {path}", f"{key}.path")
    return WorkloadSpec(
        path=path, name=str(item.get("name") or path.stem),
        rows=None if item.get("rows") is None else _number(item["rows"], f"{key}.rows", where, int, 1),
        seconds=None if item.get("seconds") is None else _number(item["seconds"], f"{key}.seconds", where, float, 0),
        time_scale=_number(item.get("time_scale", 1.0), f"{key}.time_scale", where, float, 1e-9),
        format=item.get("format"))


def _sampler(value: Any) -> str:
    if value not in SAMPLERS:
        raise InputError(f"unknown sampler {value!r} ({', '.join(SAMPLERS)})")
    return str(value)


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    text, data = read_yaml(path, "sweep spec")
    where = _Located(path, text)
    if not isinstance(data, dict):
        raise InputError("expected a mapping with 'name' and 'matrix'", file=str(path))
    for key in data:
        if key not in TOP_KEYS:
            raise where.error(f"unknown key (known: {', '.join(sorted(TOP_KEYS))})", str(key))
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise where.error("give a name of letters, digits, '-', '_' or '.'", "name")
    matrix = data.get("matrix")
    if not isinstance(matrix, dict):
        raise where.error("missing 'matrix' mapping", "matrix")
    for key in matrix:
        if key not in MATRIX_KEYS:
            raise where.error(f"unknown key (known: {', '.join(sorted(MATRIX_KEYS))})", f"matrix.{key}")

    simulator = next(n for n in engine_names() if get_engine(n).simulated)
    engines = [str(e) for e in _list(matrix.get("engines", [simulator]), "matrix.engines", where)]
    for i, engine in enumerate(engines):
        if engine not in engine_names():
            raise where.error(f"unknown engine '{engine}' ({', '.join(engine_names())})", f"matrix.engines[{i}]")
    models: list[tuple[str, bool]] = []
    for i, shape in enumerate(_list(matrix.get("model_shapes", []), "matrix.model_shapes", where)
                              if "model_shapes" in matrix else []):
        try:
            models.append((get_shape(str(shape)).name, True))
        except InputError as exc:
            raise where.error(exc.message, f"matrix.model_shapes[{i}]") from None
    if "models" in matrix:
        if any(get_engine(e).simulated for e in engines):
            raise where.error("the simulator tunes model shapes: use matrix.model_shapes", "matrix.models")
        models += [(str(m), False) for m in _list(matrix["models"], "matrix.models", where)]
    if not models:
        raise where.error("give matrix.model_shapes or matrix.models", "matrix")
    workloads = [_workload(item, f"matrix.workloads[{i}]", where)
                 for i, item in enumerate(_list(matrix.get("workloads"), "matrix.workloads", where))]
    kinds: list[str | None] = []
    for i, kind in enumerate(_list(matrix.get("gpu", [None]), "matrix.gpu", where)):
        try:
            kinds.append(None if kind is None else get_gpu(str(kind)).name)
        except InputError as exc:
            raise where.error(exc.message, f"matrix.gpu[{i}]") from None
    counts = [_number(n, f"matrix.gpus[{i}]", where, int, 1)
              for i, n in enumerate(_list(matrix.get("gpus", [1]), "matrix.gpus", where))]
    cells = [Cell(model=m, shaped=shaped, workload=w, engine=e, gpu=g or get_engine(e).default_gpu or None, gpus=n)
             for (m, shaped), w, e, g, n in itertools.product(models, workloads, engines, kinds, counts)]

    def parsed(key: str, parse):  # the field's own parser, its error placed in the spec
        try:
            return parse(data[key])
        except InputError as exc:
            raise where.error(exc.message, key) from None

    mlflow = data.get("mlflow_uri", "")
    return SweepSpec(
        name=name, path=path, cells=cells,
        trials=_number(data.get("trials", 6), "trials", where, int, 1),
        slo=parsed("slo", lambda v: parse_slo(str(v))) if data.get("slo") else None,
        objectives=parsed("latency", lambda v: Objectives.legacy(str(v))) if data.get("latency") else None,
        sim_time_scale=_number(data.get("sim_time_scale", 10.0), "sim_time_scale", where, float, 1e-9),
        sampler=parsed("sampler", _sampler) if "sampler" in data else "tpe",
        seed=None if data.get("seed", 1) is None else _number(data.get("seed", 1), "seed", where, int, 0),
        engine_python=str(data.get("engine_python") or sys.executable),
        engine_args=[str(a) for a in data.get("engine_args") or []],
        mlflow_uri=None if mlflow in (False, None, "none") else str(mlflow),
        repeats=_number(data.get("repeats", 0), "repeats", where, int, 0),
        noise_threshold=_number(data.get("noise_threshold", 0.10), "noise_threshold", where, float, 0),
        noise_floor=_number(data.get("noise_floor", 0.01), "noise_floor", where, float, 0))
