"""Which knobs moved the first objective (output throughput): Optuna's PED-ANOVA importances."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

MIN_TRIALS = 5  # sampled, completed trials; fewer give importances that mean nothing


@dataclass
class Importances:
    target: str
    values: dict[str, float] = field(default_factory=dict)  # knob -> share, summing to 1
    note: str = ""  # why there are none

    @property
    def ok(self) -> bool:
        return bool(self.values)


def param_importances(study: optuna.Study, target: str = "output_throughput") -> Importances:
    """Importances for the study's first objective. The defaults baseline is left out (it has no sampled
    parameters); each trial's first value is copied into a single-objective study so that PED-ANOVA
    reads the direction (maximise) from the study."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.params and t.values and not t.user_attrs.get("baseline")]
    if len(trials) < MIN_TRIALS:
        return Importances(target, note=f"too few trials for parameter importances: {len(trials)} completed "
                                        f"with sampled parameters, at least {MIN_TRIALS} needed")
    if not any(len({repr(t.params.get(name)) for t in trials}) > 1 for name in trials[0].params):
        return Importances(target, note="no parameter took more than one value among the completed trials")
    single = optuna.create_study(direction=study.directions[0])
    single.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.values[0])
                       for t in trials])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = optuna.importance.get_param_importances(
                single, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError) as exc:
            return Importances(target, note=f"parameter importances could not be computed: {exc}")
    return Importances(target, values={k: float(v) for k, v in values.items()})
