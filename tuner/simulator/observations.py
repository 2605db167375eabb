"""Real trials as the simulator sees them: engine, version, GPU, model shape, configuration, slice
of the trace and what was measured. Read from any Optuna study `tune` wrote."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.models.shapes import PRESETS
from tuner.simulator.config import SimConfig, parse_speculative_config
from tuner.simulator.constants import PerfConstants
from tuner.workload.request import TraceRequest
from tuner.workload.transform import load_workload

REAL_ENGINES = ("vllm", "sglang")
SIMULATED_AS = {"sim": "vllm"}  # a `tune sim-serve` trial stands in for vLLM (tests, dry runs)
CONFIG_FIELDS = {f.name for f in fields(SimConfig) if f.init}
# How the summary names the metrics a study optimises
SUMMARY_KEYS = {"output_throughput": "output_throughput", "ttft_p99": "p99_ttft_ms", "tpot_p99": "p99_tpot_ms",
                "ttft_mean": "mean_ttft_ms", "tpot_mean": "mean_tpot_ms", "tpot_median": "median_tpot_ms",
                "ttft_median": "median_ttft_ms"}


@dataclass(frozen=True)
class Observation:
    label: str
    engine: str  # vllm or sglang
    version: str
    gpu: str
    model_shape: str
    config: dict[str, Any]
    workload: str
    rows: int
    max_model_len: int | None = None
    measured: dict[str, float] = field(default_factory=dict)  # empty when the engine failed
    failure: str | None = None  # the failure class when the engine did not serve
    time_scale: float = 1.0  # the study's `--time-scale` (StudyRecord.selection); 1.0 where it predates it

    @property
    def key(self) -> str:
        """Calibration key: constants are fitted per (GPU, engine version, model shape)."""
        return calibration_key(self.gpu, self.engine, self.version, self.model_shape)

    def sim_config(self, constants: PerfConstants = PerfConstants()) -> SimConfig:
        known = sim_fields(self.config)
        return SimConfig(model_shape=self.model_shape, gpu=self.gpu, max_model_len=self.max_model_len,
                         engine=self.engine, engine_version=self.version, constants=constants, **known)

    def requests(self, root: Path) -> list[TraceRequest]:
        return load_workload(root / self.workload, rows=self.rows, time_scale=self.time_scale)


def sim_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's knobs as `SimConfig` fields: the same names, plus the search space's composite knobs
    (`cuda_graphs`, `speculative_method` with `num_speculative_tokens`); knobs it does not model are left out."""
    fields_ = {name: value for name, value in config.items() if name in CONFIG_FIELDS}
    if config.get("cuda_graphs") is False:
        fields_["enforce_eager"] = True
    method = config.get("speculative_method")
    if method and method != "none":
        spec = {"method": method, "num_speculative_tokens": int(config.get("num_speculative_tokens", 1))}
        fields_["speculative"] = parse_speculative_config(json.dumps(spec))
    return fields_


def calibration_key(gpu: str, engine: str, version: str, shape: str) -> str:
    """`gpu-engine-version-shape`, safe as a file name (a version may hold spaces or slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{gpu}-{engine}-{version}-{shape}")


def shape_of(model: str) -> str | None:
    name = Path(model.rstrip("/")).name
    return name if name in PRESETS else None


def max_model_len_of(command: list[str]) -> int | None:
    for flag in ("--max-model-len", "--context-length"):
        if flag in command[:-1]:
            return int(command[command.index(flag) + 1])
    return None


def measured_of(summary: dict[str, Any]) -> dict[str, float]:
    return {name: float(summary[key]) for name, key in SUMMARY_KEYS.items() if summary.get(key) is not None}


def observation_of(trial: FrozenTrial, study_attrs: dict[str, Any], defaults: dict[str, Any],
                   engines: tuple[str, ...] = REAL_ENGINES) -> Observation | None:
    """A completed or failed trial of one of `engines`; None for anything else (pruned, running...).

    `defaults` fill what the study does not record (a `selection` for a study older than that field);
    its `shape` names the model shape outright."""
    attrs = {**defaults, **study_attrs}
    engine = trial.user_attrs.get("engine")
    shape = defaults.get("shape") or shape_of(str(attrs.get("model", "")))
    if engine not in engines or shape is None or "config" not in trial.user_attrs:
        return None
    if trial.state == TrialState.COMPLETE:
        summary = trial.user_attrs.get("summary") or {}
        rows, measured, failure = summary.get("completed", 0) + summary.get("failed", 0), measured_of(summary), None
    elif trial.state == TrialState.FAIL and trial.user_attrs.get("failure"):
        rows, measured, failure = 0, {}, str(trial.user_attrs["failure"])
    else:
        return None
    version = (attrs.get("engine_versions") or {}).get(engine, "unknown")
    return Observation(label=f"{attrs.get('study', '?')}#{trial.number}", engine=SIMULATED_AS.get(engine, engine),
                       version=version,
                       gpu=str(attrs.get("gpu", "h100")), model_shape=shape, config=dict(trial.user_attrs["config"]),
                       workload=str(attrs.get("workload", "")), rows=rows,
                       max_model_len=max_model_len_of(list(trial.user_attrs.get("command") or [])),
                       measured=measured, failure=failure,
                       time_scale=float((attrs.get("selection") or {}).get("time_scale") or 1.0))


def observations_from_study(study: optuna.Study, defaults: dict[str, Any] | None = None,
                            engines: tuple[str, ...] = REAL_ENGINES) -> list[Observation]:
    attrs = {**study.user_attrs, "study": study.study_name}
    found = (observation_of(trial, attrs, defaults or {}, engines) for trial in study.get_trials(deepcopy=False))
    return [o for o in found if o is not None]


def observations_from_store(path: str | Path, defaults: dict[str, Any] | None = None) -> list[Observation]:
    """Every real trial of every study in an Optuna SQLite file."""
    url = f"sqlite:///{path}"
    out: list[Observation] = []
    for summary in optuna.get_all_study_summaries(url, include_best_trial=False):
        out += observations_from_study(optuna.load_study(study_name=summary.study_name, storage=url), defaults)
    return out
