"""Fit the performance model's constants (`PerfConstants`) to real trials.

Each real trial is replayed in-process with its own configuration and trace slice; Nelder-Mead (in
log space, so every constant stays positive) minimises the squared log error of the predicted
throughput and latency statistics against the measured ones. Fits are stored as JSON with the study
and, per (GPU, engine version, model shape), in a cache reused by later studies on the same hardware.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuner.simulator.config import EngineStartupError
from tuner.simulator.constants import PerfConstants
from tuner.simulator.observations import Observation
from tuner.simulator.offline import replay
from tuner.workload.request import TraceRequest

FITTED = ("linear_mfu", "gemm_ramp_tokens", "attention_mfu", "kv_bw_efficiency", "step_overhead_s", "fp8_kv_speedup")
# Bounds keep the search physical: efficiencies are shares of the datasheet.
BOUNDS = {"linear_mfu": (0.2, 1.0), "gemm_ramp_tokens": (1.0, 4096.0), "attention_mfu": (0.05, 1.0),
          "kv_bw_efficiency": (0.1, 1.0), "step_overhead_s": (1e-5, 5e-3), "fp8_kv_speedup": (0.5, 2.0)}
# Where every fit starts: datasheet-level shares any Hopper-class GPU reaches, no trial looked at.
PRIOR = PerfConstants(linear_mfu=0.5, gemm_ramp_tokens=256.0, attention_mfu=0.45, kv_bw_efficiency=0.8,
                      step_overhead_s=0.35e-3, fp8_kv_speedup=1.0)
# Squared log errors weighted per metric: throughput and the percentiles a study optimises count most;
# means and medians add signal about what drives them.
WEIGHTS = {"output_throughput": 4.0, "ttft_p99": 1.0, "tpot_p99": 1.0, "ttft_mean": 0.5, "tpot_mean": 0.5,
           "tpot_median": 0.5}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "servetune" / "calibration"


@dataclass(frozen=True)
class Calibration:
    key: str  # gpu-engine-version-shape
    constants: PerfConstants
    loss: float
    trials: tuple[str, ...]  # labels of the trials it was fitted on

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "constants": self.constants.as_dict(), "loss": self.loss,
                           "trials": list(self.trials)}, indent=1)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def save_cached(self) -> Path:
        return self.save(cache_dir() / f"{self.key}.json")


def load_cached(key: str) -> Calibration | None:
    path = cache_dir() / f"{key}.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return Calibration(data["key"], PerfConstants.from_dict(data["constants"], str(path)),
                           float(data["loss"]), tuple(data["trials"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is refitted, not fatal


Replayer = Callable[[Observation, PerfConstants], dict[str, float] | None]


def simulate_observation(requests_of: Callable[[Observation], Sequence[TraceRequest]]) -> Replayer:
    """Predicted metrics of one trial under `constants`; None when the simulator refuses the config."""
    def run(observation: Observation, constants: PerfConstants) -> dict[str, float] | None:
        try:
            return replay(observation.sim_config(constants), requests_of(observation)).metrics()
        except EngineStartupError:
            return None
    return run


def loss(observations: Sequence[Observation], constants: PerfConstants, predict: Replayer) -> float:
    total = 0.0
    for observation in observations:
        predicted = predict(observation, constants)
        if predicted is None:
            total += 100.0
            continue
        for metric, weight in WEIGHTS.items():
            real, sim = observation.measured.get(metric), predicted.get(metric)
            if real and sim and real > 0 and sim > 0:
                total += weight * math.log(sim / real) ** 2
    return total / max(1, len(observations))


def fit(observations: Sequence[Observation], predict: Replayer, start: PerfConstants = PRIOR,
        fitted: Sequence[str] = FITTED, max_evals: int = 120) -> Calibration:
    """Least squares over `fitted` constants, from `start`; the others stay as they are."""
    served = [o for o in observations if o.measured]
    if not served:
        raise ValueError("calibration needs at least one completed real trial")

    def to_constants(x: np.ndarray) -> PerfConstants:
        values = {}
        for name, value in zip(fitted, np.exp(x)):
            low, high = BOUNDS[name]
            values[name] = float(min(max(value, low), high))
        return start.with_values(values)

    x0 = np.log([getattr(start, name) for name in fitted])
    best_x, best = nelder_mead(lambda x: loss(served, to_constants(x), predict), x0, max_evals=max_evals)
    return Calibration(served[0].key, to_constants(best_x), best, tuple(o.label for o in served))


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, step: float = 0.25,
                max_evals: int = 120, tolerance: float = 1e-5) -> tuple[np.ndarray, float]:
    """Plain Nelder-Mead (reflect 1, expand 2, contract 0.5, shrink 0.5) from a simplex of `step`."""
    n = len(x0)
    simplex = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    values = [f(x) for x in simplex]
    evals = n + 1
    while evals < max_evals:
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tolerance:
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        evals += 1
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            fe = f(expanded)
            evals += 1
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            evals += 1
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
                evals += n
    i = int(np.argmin(values))
    return simplex[i], values[i]
