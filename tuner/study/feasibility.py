"""Hidden constraints: learn from failed launches where configurations fail, and do not launch there.

Known constraints (`tuner.space.constraints`) are checked before a launch. Others only show on the
GPU: the KV cache does not fit at this memory fraction with this KV dtype and batch budget, a backend
does not support a quantization. Every trial that ran, or failed for such a reason, is an
observation (knob vector, failed?). The model is a kernel-weighted vote of these observations
(Nadaraya-Watson with a Gaussian kernel and a prior pseudo-observation at p = 0.5): a proposal close
to failures and far from successes gets a high failure probability. Above `threshold` (and after at
least `min_failures` real failures), the proposal is not launched: it is told to Optuna as PRUNED
with a positive constraint `launchable`, which the TPE and NSGA-II samplers rank below every
feasible trial, so they learn to propose elsewhere (a FAIL state would be ignored by them).

Encoding: a categorical or bool knob is one-hot, each side scaled by 1/sqrt(2) so that changing it
moves a point by 1; a number is placed in [0, 1] over its range (log scale for log knobs or for
positive values spanning 8x or more). A knob a configuration lacks (inactive condition) encodes as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import optuna
from optuna.trial import TrialState

from tuner.outcome import Outcome
from tuner.space.knobs import SearchSpace

PREDICTED_INFEASIBLE = Outcome.PREDICTED_INFEASIBLE
LAUNCHABLE = "launchable"  # the Optuna constraint name
# failures the knob vector explains; crashes, hangs, timeouts and request errors may be transient
CONFIG_FAILURES = frozenset({Outcome.OOM_STARTUP, Outcome.OOM_LOAD, Outcome.UNSUPPORTED,
                             Outcome.INVALID_CONFIG})
_HALF_SQRT2 = 1 / math.sqrt(2)


@dataclass(frozen=True)
class Observation:
    config: dict[str, Any]
    failed: bool
    failure: str | None = None


@dataclass(frozen=True)
class Verdict:
    launch: bool
    p_fail: float
    reason: str


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class KnobEncoder:
    """Configurations as points in a unit box (see the module docstring)."""

    def __init__(self, configs: Sequence[dict[str, Any]], space: SearchSpace | None = None) -> None:
        self.numeric: dict[str, tuple[float, float, bool]] = {}  # name -> (low, high, log)
        self.categories: dict[str, list[str]] = {}
        names = dict.fromkeys(k for c in configs for k in c)
        for name in names:
            values = [c[name] for c in configs if name in c]
            knob = space.knobs.get(name) if space is not None else None
            if knob is not None and knob.type in ("int", "float") or (
                    knob is None and values and all(_is_number(v) for v in values)):
                low = min([*values, *([knob.low] if knob is not None and knob.low is not None else [])])
                high = max([*values, *([knob.high] if knob is not None and knob.high is not None else [])])
                log = (knob.log if knob is not None and knob.type != "categorical" else False) or (
                    low > 0 and high / low >= 8)
                self.numeric[name] = (float(low), float(high), bool(log))
            else:
                choices = [str(c) for c in knob.choices] if knob is not None and knob.choices else []
                self.categories[name] = list(dict.fromkeys([*choices, *(str(v) for v in values)]))

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categories.values())

    def encode(self, config: dict[str, Any]) -> np.ndarray:
        vector = np.zeros(self.width)
        position = 0
        for name, (low, high, log) in self.numeric.items():
            value = config.get(name)
            if _is_number(value) and high > low:
                if log:
                    x = (math.log(max(value, low)) - math.log(low)) / (math.log(high) - math.log(low))
                else:
                    x = (value - low) / (high - low)
                vector[position] = min(max(x, 0.0), 1.0)
            position += 1
        for name, choices in self.categories.items():
            if name in config and str(config[name]) in choices:
                vector[position + choices.index(str(config[name]))] = _HALF_SQRT2
            position += len(choices)
        return vector


class FeasibilityModel:
    def __init__(self, space: SearchSpace | None = None, threshold: float = 0.7, min_failures: int = 2,
                 bandwidth: float = 0.35, prior_weight: float = 0.5) -> None:
        self.space = space
        self.threshold = threshold
        self.min_failures = min_failures
        self.bandwidth = bandwidth
        self.prior_weight = prior_weight
        self.observations: list[Observation] = []
        self.encoder: KnobEncoder | None = None
        self.points = np.zeros((0, 0))
        self.labels = np.zeros(0)

    def fit(self, observations: Iterable[Observation]) -> FeasibilityModel:
        self.observations = list(observations)
        self.encoder = KnobEncoder([o.config for o in self.observations], self.space)
        self.points = np.array([self.encoder.encode(o.config) for o in self.observations]).reshape(
            len(self.observations), self.encoder.width)
        self.labels = np.array([1.0 if o.failed else 0.0 for o in self.observations])
        return self

    @property
    def failures(self) -> int:
        return int(self.labels.sum())

    def _weights(self, config: dict[str, Any]) -> np.ndarray:
        assert self.encoder is not None, "fit() first"
        distance2 = ((self.points - self.encoder.encode(config)) ** 2).sum(axis=1)
        return np.exp(-distance2 / (2 * self.bandwidth ** 2))

    def predict_fail_probability(self, config: dict[str, Any]) -> float:
        if not self.observations:
            return 0.5
        weights = self._weights(config)
        return float((weights @ self.labels + 0.5 * self.prior_weight) / (weights.sum() + self.prior_weight))

    def verdict(self, config: dict[str, Any]) -> Verdict:
        if self.failures < self.min_failures:
            return Verdict(True, self.predict_fail_probability(config) if self.observations else 0.5,
                           f"{self.failures} failure(s) seen, fewer than {self.min_failures}: launch")
        p_fail = self.predict_fail_probability(config)
        if p_fail < self.threshold:
            return Verdict(True, p_fail, f"p_fail {p_fail:.2f} < {self.threshold:g}")
        weights = self._weights(config) * self.labels
        nearest = self.observations[int(np.argmax(weights))]
        like = {k: v for k, v in nearest.config.items() if str(config.get(k)) == str(v)}
        return Verdict(False, p_fail, f"predicted to fail (p {p_fail:.2f}) like trials that failed with "
                                      f"{nearest.failure or 'a failure'}, sharing {like}")


def observations_from_study(study: optuna.Study, engine: str | None = None) -> list[Observation]:
    """Trials that ran (completed or pruned while measuring) and trials that failed for a
    configuration reason; not predictions, rejections by known constraints, or transient failures.
    With `engine`, only that engine's trials (user attribute `engine`)."""
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL,
                                                           TrialState.PRUNED)):
        if engine is not None and trial.user_attrs.get("engine", engine) != engine:
            continue
        config = trial.user_attrs.get("config")
        failure = trial.user_attrs.get("failure")
        if config is None or failure == PREDICTED_INFEASIBLE:
            continue
        if failure in CONFIG_FAILURES:
            out.append(Observation(config, True, failure))
        elif failure is None and trial.state != TrialState.FAIL:
            out.append(Observation(config, False))
    return out


def tell_infeasible(study: optuna.Study, trial: optuna.Trial, failure: str, message: str,
                    p_fail: float = 1.0) -> None:
    """End `trial` as infeasible in a way the samplers learn from: PRUNED with constraint
    `launchable` = p_fail > 0 (`failure` and `message` go to its user attributes)."""
    trial.set_user_attr("failure", failure)
    trial.set_user_attr("message", message)
    trial.set_constraint(LAUNCHABLE, max(p_fail, 1e-3))
    study.tell(trial, state=TrialState.PRUNED)


def launches_avoided(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
               if t.user_attrs.get("failure") == PREDICTED_INFEASIBLE)
