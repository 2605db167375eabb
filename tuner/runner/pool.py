"""Trials on Ray: one actor per GPU group, as many at once as the GPUs allow."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from tuner.runner.trial import TrialOutcome, TrialSpec, execute_trial


@ray.remote(max_restarts=0)
class TrialActor:
    """Owns one trial at a time on the GPUs Ray gave it (CUDA_VISIBLE_DEVICES is set by Ray)."""

    def run(self, spec: TrialSpec) -> TrialOutcome:
        return execute_trial(spec)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def init_ray(address: str | None, gpus: int) -> None:
    """Join a cluster, or start a local one; without real GPUs give Ray `gpus` logical ones."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_gpus=gpus, num_cpus=max(os.cpu_count() or 1, gpus + 1), **kwargs)


@dataclass
class _Running:
    spec: TrialSpec
    gpus: int
    actor: "ray.actor.ActorHandle"
    ref: "ray.ObjectRef"


class TrialPool:
    """Submit trials with their GPU count; collect outcomes as they finish."""

    def __init__(self, total_gpus: int) -> None:
        self.total_gpus = total_gpus
        self.running: dict["ray.ObjectRef", _Running] = {}

    @property
    def free_gpus(self) -> int:
        return self.total_gpus - sum(item.gpus for item in self.running.values())

    def submit(self, spec: TrialSpec, gpus: int) -> None:
        actor = TrialActor.options(num_gpus=gpus, num_cpus=0).remote()
        ref = actor.run.remote(spec)
        self.running[ref] = _Running(spec, gpus, actor, ref)

    def wait_one(self) -> tuple[TrialSpec, TrialOutcome | None, str]:
        """The next finished trial: (spec, outcome, error). A lost actor gives outcome None and the error."""
        ready, _ = ray.wait(list(self.running), num_returns=1)
        item = self.running.pop(ready[0])
        try:
            outcome, error = ray.get(item.ref), ""
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            outcome, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ray.kill(item.actor)
        return item.spec, outcome, error

    def __len__(self) -> int:
        return len(self.running)
