"""`tune --prescreen sim`: the calibrated simulator screens proposals before they reach a GPU.

Each proposal is replayed in-process through the simulator (the trace, the trial's configuration,
the study's GPU and model shape, the engine's scheduler) with constants fitted to this study's own
real results (`tuner.simulator.calibration`), refitted whenever a new real result came in and
started from the per-hardware cache of earlier studies. A proposal launches only when its predicted
score (goodput per GPU with an SLO, else output throughput) ranks in the best `keep` share of
everything predicted so far in the study, the defaults' prediction included. Screening starts at once
when earlier studies on this hardware left a calibration in the cache (proposals made while the
defaults still run are screened too); without one, proposals launch regardless until `warmup` real
results exist to fit on. A screened-out proposal is told to Optuna as PRUNED with user attrs
`prescreened` (why) and `predicted` (the simulator's metrics), so the sampler learns from it without a
GPU; every launched trial carries `predicted` too, next to what it measured.

With a cached calibration the simulator also proposes (`guesser`): while the defaults trial runs, a small
in-memory Optuna study on the simulator alone picks the configurations it predicts best, above the
defaults, each of another kind; `tune` queues them next (user attr `seeded`) and they are never screened
out, so the first searched trials on the GPUs are the simulator's best candidates, not random start-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from tuner.loadgen.slo import SLO
from tuner.simulator.calibration import Calibration, fit, load_cached, simulate_observation
from tuner.simulator.config import EngineStartupError
from tuner.simulator.constants import PerfConstants
from tuner.simulator.observations import Observation, calibration_key, observations_from_study
from tuner.simulator.offline import replay
from tuner.space.constraints import Context, gpus_needed, violations
from tuner.space.fit import unavailable_in
from tuner.space.knobs import SearchSpace
from tuner.study.sampling import suggest_config
from tuner.workload.request import TraceRequest

PRESCREEN_MODES = ("off", "sim")


@dataclass
class Prescreen:
    gpu: str
    shape: str
    engine_versions: dict[str, str]
    requests: Sequence[TraceRequest]
    max_model_len: int | None = None
    slo: SLO | None = None
    keep: float = 0.25  # share of proposals (by predicted score) that may launch
    warmup: int = 3  # real results before screening starts, without a cached calibration
    fit_evals: int = 20  # simulator replays per refit, each while the GPUs wait
    run_dir: Path | None = None  # where the study's calibration JSON goes
    engines: tuple[str, ...] = ("vllm", "sglang", "sim")  # whose results count as real (sim: tests)
    say: Callable[[str], None] = print
    scores: list[float] = field(default_factory=list)
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    screened: int = 0
    _fitted_on: dict[str, int] = field(default_factory=dict)
    _cached: dict[str, bool] = field(default_factory=dict)  # a calibration was cached before this study

    def observations(self, study: optuna.Study) -> list[Observation]:
        defaults = {"gpu": self.gpu, "shape": self.shape, "engine_versions": self.engine_versions}
        return [o for o in observations_from_study(study, defaults, self.engines) if o.measured]

    def constants(self, study: optuna.Study, engine: str) -> PerfConstants:
        """Constants for `engine` on this hardware, refitted when real results arrived since the last fit."""
        mine = [o for o in self.observations(study) if o.engine == _simulated(engine)]
        key = self._key(engine)
        current = self.calibrations.get(key) or load_cached(key)
        self._cached.setdefault(key, current is not None)
        start = current.constants if current else PerfConstants()
        if mine and len(mine) != self._fitted_on.get(key):
            predict = simulate_observation(lambda o: self.requests)
            current = fit(mine, predict, start=start, max_evals=self.fit_evals)
            current = Calibration(key, current.constants, current.loss, current.trials)
            self._fitted_on[key] = len(mine)
            current.save_cached()
            if self.run_dir is not None:
                current.save(self.run_dir / f"calibration-{key}.json")
        if current is not None:
            self.calibrations[key] = current
        return current.constants if current else start

    def predict(self, study: optuna.Study, engine: str, config: dict[str, Any]) -> dict[str, float] | str:
        """The simulator's metrics for `config`, or the engine's start-up error message."""
        return self._predict(self.constants(study, engine), engine, config)

    def _predict(self, constants: PerfConstants, engine: str, config: dict[str, Any]) -> dict[str, float] | str:
        observation = Observation(label="proposal", engine=_simulated(engine), version=self._version(engine),
                                  gpu=self.gpu, model_shape=self.shape, config=config, workload="", rows=0,
                                  max_model_len=self.max_model_len)
        try:
            return replay(observation.sim_config(constants), self.requests, self.slo).metrics()
        except EngineStartupError as exc:
            return str(exc)

    def score(self, predicted: dict[str, float], config: dict[str, Any]) -> float:
        """Predicted goodput per GPU with an SLO (what a goodput study ranks by), else output throughput."""
        if self.slo is not None:
            return predicted.get("goodput", 0.0) / gpus_needed(config)
        return predicted["output_throughput"]

    def warmed_up(self, study: optuna.Study, engine: str) -> bool:
        """Constants worth screening with: a cached calibration of this hardware, or `warmup` real results."""
        needed = 0 if self._cached.get(self._key(engine)) else self.warmup
        return len(self.observations(study)) >= needed

    def screen(self, study: optuna.Study, trial: optuna.Trial, engine: str, config: dict[str, Any],
               baseline: bool = False) -> bool:
        """True: launch. False: told to Optuna as PRUNED, with `prescreened` and `predicted` user attrs.
        The defaults baseline and the simulator's own best guesses (`seeded`) always launch, with their
        predictions; the defaults' score is the bar every later proposal must pass."""
        if not self.scores:  # a resumed study: rank against every prediction made before
            self.scores = [self.score(t.user_attrs["predicted"], t.user_attrs.get("config") or {})
                           for t in study.get_trials(deepcopy=False)
                           if "output_throughput" in (t.user_attrs.get("predicted") or {})]
        predicted = self.predict(study, engine, config)
        if isinstance(predicted, str):
            trial.set_user_attr("predicted", {"refused": predicted})
            if baseline:
                return True
            reason = f"the simulator refuses to start it: {predicted}"
        else:
            rounded = predicted if baseline else {name: round(value, 3) for name, value in predicted.items()}
            trial.set_user_attr("predicted", rounded)
            score = self.score(predicted, config)
            self.scores.append(score)
            cut = float(np.quantile(self.scores, 1.0 - self.keep)) if len(self.scores) > 1 else -np.inf
            if baseline or trial.user_attrs.get("seeded") or not self.warmed_up(study, engine) or score >= cut:
                return True
            what = "goodput per GPU" if self.slo is not None else "tok/s"
            reason = (f"predicted {score:.3g} {what}, below the best {self.keep:.0%} "
                      f"of {len(self.scores)} predictions (cut {cut:.3g})")
        trial.set_user_attr("prescreened", reason)
        study.tell(trial, state=TrialState.PRUNED)
        self.screened += 1
        self.say(f"trial {trial.number}: screened out by the simulator ({reason})")
        return False

    def guesser(self, study: optuna.Study, spaces: dict[str, SearchSpace], context: Context, count: int = 2,
                samples: int = 200, budget_s: float = 60.0, seed: int | None = None,
                stop: threading.Event | None = None) -> Callable[[], list[tuple[dict[str, Any], str]]]:
        """What `best_guesses` runs, ready to run in another thread (`stop` ends it early): the calibrated
        constants are read here, so the work itself touches neither the study nor this prescreen's state."""
        constants = {name: self.constants(study, name) for name in spaces}  # also learns what was cached
        spaces = {name: space for name, space in spaces.items() if self._cached.get(self._key(name))}

        def guess() -> list[tuple[dict[str, Any], str]]:
            if not spaces:
                return []
            first, defaults = next(iter(spaces)), next(iter(spaces.values())).defaults()
            predicted = self._predict(constants[first], first, defaults)
            bar = self.score(predicted, defaults) if isinstance(predicted, dict) else 0.0
            inner = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
            found: dict[tuple, tuple[float, float, dict[str, Any]]] = {}
            started = time.monotonic()
            for _ in range(samples):
                if time.monotonic() - started > budget_s or (stop is not None and stop.is_set()):
                    break
                trial = inner.ask()
                engine, config = suggest_config(trial, spaces)
                result: dict[str, float] | str = "outside the space's constraints"
                if not violations(config, context) and not unavailable_in(spaces[engine], config):
                    result = self._predict(constants[engine], engine, config)
                if not isinstance(result, dict):
                    inner.tell(trial, state=TrialState.FAIL)
                    continue
                score = self.score(result, config)
                inner.tell(trial, score)
                found[tuple(sorted(trial.params.items()))] = (score, -self._slo_load(result), trial.params)
            ranked = sorted(found.values(), key=lambda item: item[:2], reverse=True)
            picked: list[tuple[float, dict[str, Any]]] = []
            for score, _, params in ranked:  # each guess of another kind (a categorical knob differs)
                if len(picked) < count and score > bar and all(_kind(params, spaces) != _kind(other, spaces)
                                                                 for _, other in picked):
                    picked.append((score, params))
            what = "goodput per GPU" if self.slo is not None else "tok/s"
            return [(params, f"the simulator's best guess {rank + 1} of {len(found)} simulated: predicted "
                             f"{score:.3g} {what}, the defaults {bar:.3g}")
                    for rank, (score, params) in enumerate(picked)]

        return guess

    def _slo_load(self, predicted: dict[str, float]) -> float:
        """The largest predicted percentile / its SLO limit: among equal scores, the lower the safer."""
        targets = self.slo.targets if self.slo is not None else ()
        return max((predicted[t.name] / t.limit_ms for t in targets if t.name in predicted), default=0.0)

    def best_guesses(self, study: optuna.Study, spaces: dict[str, SearchSpace], context: Context,
                     **options: Any) -> list[tuple[dict[str, Any], str]]:
        """Up to `count` configurations (Optuna params, and why) that the simulator alone predicts best, above
        the defaults of the first engine: a TPE study of at most `samples` simulated replays or `budget_s`
        seconds, in memory. Only for engines whose calibration on this hardware was cached (else [])."""
        return self.guesser(study, spaces, context, **options)()

    def _key(self, engine: str) -> str:
        return calibration_key(self.gpu, _simulated(engine), self._version(engine), self.shape)

    def _version(self, engine: str) -> str:
        return self.engine_versions.get(engine, "unknown")


def _kind(params: dict[str, Any], spaces: dict[str, SearchSpace]) -> tuple:
    """A configuration's categorical choices (engine, backend, dtypes; not on/off switches), from its params."""
    categorical = {name for space in spaces.values() for name, knob in space.knobs.items()
                   if knob.type == "categorical"} | {"engine"}
    return tuple(sorted((name.rsplit(".", 1)[-1], str(value)) for name, value in params.items()
                        if name.rsplit(".", 1)[-1] in categorical))


def _simulated(engine: str) -> str:
    return "sglang" if engine == "sglang" else "vllm"


def make_prescreen(options: Any, engine_versions: dict[str, str], run_dir: Path,
                   say: Callable[[str], None]) -> Prescreen | None:
    """The prescreen `tune --prescreen` asks for, from the tune options; None when off."""
    if getattr(options, "prescreen", "off") in (None, "off"):
        return None
    shape = options.shape.name if options.shape is not None else options.model
    return Prescreen(gpu=options.gpu or "h100", shape=shape, engine_versions=engine_versions,
                     requests=options.requests, max_model_len=options.max_model_len, slo=options.slo,
                     keep=options.prescreen_keep, run_dir=run_dir, say=say)
