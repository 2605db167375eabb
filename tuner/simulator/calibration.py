"""Fit the performance model's constants (`PerfConstants`) to real trials.

Each real trial is replayed in-process with its own configuration and trace slice; Levenberg-Marquardt
(in log space, so every constant stays positive; Jacobian by finite differences, the simulator being a
black box) minimises the weighted squared log error of the predicted throughput and latency
statistics against the measured ones. Fits are stored as JSON with the study
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
BOUNDS = {"linear_mfu": (0.2, 1.0), "gemm_ramp_tokens": (1.0, 4096.0), "attention_mfu": (0.05, 0.8),
          "kv_bw_efficiency": (0.1, 1.0), "step_overhead_s": (1e-5, 5e-3), "fp8_kv_speedup": (0.5, 2.0)}
# Where every fit starts: datasheet-level shares any Hopper-class GPU reaches, no trial looked at.
PRIOR = PerfConstants(linear_mfu=0.5, gemm_ramp_tokens=256.0, attention_mfu=0.45, kv_bw_efficiency=0.8,
                      step_overhead_s=0.35e-3, fp8_kv_speedup=1.0)
# Squared log errors weighted per metric: throughput and the percentiles a study optimises count most;
# means and medians add signal about what drives them.
WEIGHTS = {"output_throughput": 4.0, "ttft_p99": 1.0, "tpot_p99": 1.0, "ttft_mean": 0.5, "ttft_median": 0.5,
           "tpot_mean": 0.5, "tpot_median": 0.5}


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


def residuals(observations: Sequence[Observation], constants: PerfConstants, predict: Replayer) -> np.ndarray:
    """sqrt(weight) x log(sim / real) per trial and metric; a refused configuration costs 10 per metric."""
    out = []
    for observation in observations:
        predicted = predict(observation, constants)
        for metric, weight in WEIGHTS.items():
            real = observation.measured.get(metric)
            if not real or real <= 0:
                continue
            sim = predicted.get(metric) if predicted else None
            out.append(math.sqrt(weight) * (math.log(sim / real) if sim and sim > 0 else 10.0))
    return np.asarray(out)


def loss(observations: Sequence[Observation], constants: PerfConstants, predict: Replayer) -> float:
    return float(np.sum(residuals(observations, constants, predict) ** 2)) / max(1, len(observations))


def fit(observations: Sequence[Observation], predict: Replayer, start: PerfConstants = PRIOR,
        fitted: Sequence[str] = FITTED, max_evals: int = 120) -> Calibration:
    """Least squares over `fitted` constants, from `start`; the others stay as they are."""
    served = [o for o in observations if o.measured]
    if not served:
        raise ValueError("calibration needs at least one completed real trial")
    low = np.log([BOUNDS[name][0] for name in fitted])
    high = np.log([BOUNDS[name][1] for name in fitted])

    def to_constants(x: np.ndarray) -> PerfConstants:
        return start.with_values({name: float(v) for name, v in zip(fitted, np.exp(np.clip(x, low, high)))})

    x0 = np.clip(np.log([getattr(start, name) for name in fitted]), low, high)
    x = levenberg_marquardt(lambda x: residuals(served, to_constants(x), predict), x0, low, high, max_evals)
    constants = to_constants(x)
    return Calibration(served[0].key, constants, loss(served, constants, predict), tuple(o.label for o in served))


def levenberg_marquardt(f: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, low: np.ndarray,
                        high: np.ndarray, max_evals: int, step: float = 0.03) -> np.ndarray:
    """Minimise |f(x)|^2 within [low, high]; forward-difference Jacobian of `step` (log units: 3 %)."""
    x, r = x0, f(x0)
    cost, damping, evals = float(r @ r), 0.1, 1
    while evals + len(x) + 1 <= max_evals:
        jacobian = np.empty((len(r), len(x)))
        for i in range(len(x)):
            h = step if x[i] + step <= high[i] else -step
            xi = x.copy()
            xi[i] += h
            jacobian[:, i] = (f(xi) - r) / h
        evals += len(x)
        gradient, normal = jacobian.T @ r, jacobian.T @ jacobian
        improved = False
        while evals < max_evals and damping < 1e6:
            delta = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-9), -gradient)
            candidate = np.clip(x + delta, low, high)
            rc = f(candidate)
            evals += 1
            if float(rc @ rc) < cost:
                x, r, cost, damping, improved = candidate, rc, float(rc @ rc), damping / 3, True
                break
            damping *= 4
        if not improved or cost < 1e-10:
            break
    return x
