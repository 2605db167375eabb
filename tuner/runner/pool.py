"""Trials on Ray: each in its own placement group (all its GPUs on one node), as many at once as fit."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from tuner.errors import InputError
from tuner.outcome import Outcome
from tuner.runner import reaper
from tuner.runner.placement import Placement, nvlink_order, nvlink_peers
from tuner.runner.reaper import OWNER_ENV, TOKEN_ENV, reap
from tuner.runner.trial import TrialOutcome, TrialSpec, execute_trial

LOST = Outcome.LOST  # a trial whose actor or node died under it
CPUS_PER_TRIAL = 1  # the actor drives the server and replays the trace: one core's worth


@ray.remote(max_restarts=0)
class TrialActor:
    """Owns one trial on the GPUs Ray gave it (CUDA_VISIBLE_DEVICES is set by Ray, reordered by prepare)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def prepare(self, tensor_parallel: int) -> Placement:
        """Order the GPUs for NVLink, mark what this trial starts (see reaper), and say where we are."""
        ids = [str(i) for i in ray.get_gpu_ids()]
        nvlink = None
        if tensor_parallel > 1 and ids and all(i.isdigit() for i in ids):
            peers = nvlink_peers()
            if peers:
                ordered, nvlink = nvlink_order([int(i) for i in ids], peers, tensor_parallel)
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ordered)
        os.environ[TOKEN_ENV] = self.token
        return Placement(node_id=self.node(), gpu_ids=tuple(ids),
                         cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""), nvlink=nvlink)

    def run(self, spec: TrialSpec) -> TrialOutcome:
        return execute_trial(spec)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0, max_retries=0)
def _reap_on_node(token: str) -> list[int]:
    return reap(token)


def init_ray(address: str | None, gpus: int) -> None:
    """Join a cluster, or start a local one; without real GPUs give Ray `gpus` logical ones."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's "Token authentication is enabled ..." banner on every run: the default stays, the banner goes
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise InputError(f"cannot join the Ray cluster at {address!r}: {reason}", field="ray-address") from None
    else:
        token = start_watchdog()
        inherited = os.environ.get(OWNER_ENV)
        if token:
            os.environ[OWNER_ENV] = token  # what ray.init starts carries it, and what those start in turn
        try:
            context = ray.init(num_gpus=gpus, num_cpus=max(os.cpu_count() or 1, gpus * CPUS_PER_TRIAL + 1), **kwargs)
        finally:  # our own later children (a test's servers, another `tune`) are not the cluster's
            os.environ.pop(OWNER_ENV, None)
            if inherited is not None:
                os.environ[OWNER_ENV] = inherited
        session_dir = getattr(context, "address_info", {}).get("session_dir")  # a RayContext, typed BaseContext
        if _watchdog is not None and _watchdog.stdin is not None and session_dir:
            _watchdog.stdin.write(f"{session_dir}\n".encode())
            _watchdog.stdin.flush()


_watchdog: subprocess.Popen[bytes] | None = None  # held for our whole life: its stdin closes when we end


def start_watchdog() -> str:
    """A watcher in its own session that, as soon as we end, however we end, kills the processes marked
    with the token returned and the Ray processes holding files in the session folder we send it
    (see reaper.watch_owner). "" where there is no /proc to find them in."""
    global _watchdog
    if not sys.platform.startswith("linux"):
        return ""
    if _watchdog is not None and _watchdog.stdin is not None:  # the cluster before this one was shut down
        _watchdog.stdin.close()
        _watchdog.wait(timeout=30)
    token = uuid.uuid4().hex
    _watchdog = subprocess.Popen([sys.executable, reaper.__file__, token], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return token


def check_reachable(address: str) -> None:
    """A HOST:PORT where nothing listens is one line now, not minutes of Ray retrying to reach it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # `auto`, `local`: Ray looks for a cluster on this machine and says so at once
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise InputError(f"nothing answers at {address!r} ({exc.strerror or exc}): is the head node's "
                         "`ray start --head` running?", field="ray-address") from None


def cluster_gpus() -> dict[str, int]:
    """GPUs of each live node of the cluster, by node id."""
    return {node["NodeID"]: int(node["Resources"].get("GPU", 0)) for node in ray.nodes()
            if node["Alive"] and node["Resources"].get("GPU", 0) >= 1}


@dataclass
class Finished:
    """A trial the pool is done with: its outcome, or why there is none."""

    spec: TrialSpec
    outcome: TrialOutcome | None
    error: str = ""
    lost: bool = False  # the actor or its node died: the configuration deserves another try
    placement: Placement | None = None
    node_id: str | None = None
    reaped: list[int] = field(default_factory=list)  # leftover server pids killed after a loss

    @property
    def node(self) -> str:
        """The node the trial ran on: as reported with the outcome, else where it was placed; "" if unknown."""
        return self.node_id or (self.placement.node_id if self.placement else "")


@dataclass
class _Running:
    spec: TrialSpec
    gpus: int
    actor: ray.actor.ActorHandle
    ref: ray.ObjectRef
    placement_ref: ray.ObjectRef
    group: PlacementGroup
    token: str
    node_id: str | None = None


def _cause(exc: Exception) -> str:
    """One line out of Ray's many: its first, and the one that says why the actor died, if any."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = next((line for line in lines[1:] if "because" in line or "died" in line.lower()), "")
    return " ".join(dict.fromkeys([f"{type(exc).__name__}: {lines[0] if lines else ''}", why])).strip()


class TrialPool:
    """Submit trials with their GPU count; collect them as they finish.

    `fits(n)` answers from our own books (GPUs per node, minus what our trials hold; a trial whose
    group is not placed yet counts against every node) and, when we share a cluster, from what Ray
    says is free, so a proposal that does not fit can wait while smaller ones use the idle GPUs.
    """

    def __init__(self, total_gpus: int, shared_cluster: bool = False, name_prefix: str = "servetune") -> None:
        self.shared_cluster = shared_cluster
        self.name_prefix = name_prefix
        self.node_gpus = cluster_gpus()
        self.total_gpus = min(total_gpus, sum(self.node_gpus.values()))
        self.running: dict[ray.ObjectRef, _Running] = {}

    @property
    def held_gpus(self) -> int:
        return sum(item.gpus for item in self.running.values())

    @property
    def free_gpus(self) -> int:
        free = self.total_gpus - self.held_gpus
        if self.shared_cluster:
            free = min(free, int(ray.available_resources().get("GPU", 0)))
        return free

    @property
    def largest_node(self) -> int:
        return min(self.total_gpus, max(self.node_gpus.values(), default=0))

    def _node_of(self, item: _Running) -> str | None:
        if item.node_id is None:
            table = placement_group_table(item.group)
            if table.get("state") == "CREATED":
                item.node_id = table["bundles_to_node_id"][0]
        return item.node_id

    def fits(self, need: int) -> bool:
        """Whether a trial needing `need` GPUs could start on one node now."""
        if need > self.free_gpus:
            return False
        if self.shared_cluster:
            self.node_gpus = cluster_gpus()
        placed: dict[str, int] = defaultdict(int)
        unplaced = 0
        for item in self.running.values():
            node = self._node_of(item)
            if node is None:
                unplaced += item.gpus
            else:
                placed[node] += item.gpus
        return any(gpus - placed[node] - unplaced >= need for node, gpus in self.node_gpus.items())

    def actor_name(self, spec: TrialSpec) -> str:
        return f"{self.name_prefix}:trial-{spec.number}" + (f"-{spec.label}" if spec.label else "")

    def submit(self, spec: TrialSpec, gpus: int) -> None:
        token = f"{self.actor_name(spec)}/{uuid.uuid4().hex[:12]}"
        group = placement_group([{"GPU": gpus, "CPU": CPUS_PER_TRIAL}], strategy="STRICT_PACK")
        actor = TrialActor.options(  # type: ignore[attr-defined]  # ray.remote's typing hides .options
            num_gpus=gpus, num_cpus=CPUS_PER_TRIAL, name=self.actor_name(spec),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        ).remote(token)
        placement_ref = actor.prepare.remote(int(spec.launch.config.get("tensor_parallel_size", 1)))
        ref = actor.run.remote(spec)
        self.running[ref] = _Running(spec, gpus, actor, ref, placement_ref, group, token)

    def wait_one(self, timeout_s: float | None = None) -> Finished | None:
        """The next trial to finish (None if none did within timeout_s). A dead actor or node gives no
        outcome and `lost`; its leftover server processes are reaped on its node when that node lives."""
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout_s)
        if not ready:
            return None
        item = self.running.pop(ready[0])
        try:
            placement = ray.get(item.placement_ref, timeout=10)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            placement = None
        # the actor's own word first: after a node died, Ray may already have moved the group elsewhere
        node = placement.node_id if placement else self._node_of(item)
        try:
            finished = Finished(item.spec, ray.get(item.ref), placement=placement, node_id=node)
        except ray.exceptions.RayTaskError as exc:  # our code raised inside the actor
            finished = Finished(item.spec, None, error=_cause(exc), placement=placement, node_id=node)
        except ray.exceptions.RayError as exc:  # actor killed, worker crashed, node gone
            finished = Finished(item.spec, None, error=_cause(exc), lost=True, placement=placement,
                                node_id=node, reaped=self._reap(node, item.token))
            self.node_gpus = cluster_gpus()
        self._release(item)
        return finished

    def _reap(self, node: str | None, token: str) -> list[int]:
        if node is None or node not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}:
            return []  # a dead node took its processes with it
        task = _reap_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        try:
            return ray.get(task.remote(token), timeout=60)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return []

    def _release(self, item: _Running) -> None:
        ray.kill(item.actor)
        remove_placement_group(item.group)

    def close(self) -> None:
        """Stop every trial still running (their servers die with their actors) and free the GPUs."""
        for item in self.running.values():
            self._release(item)
        self.running.clear()

    def wait_for_room(self, need: int, poll_s: float = 0.5, timeout_s: float = 5.0) -> bool:
        """With no trial of ours running, wait a little for GPUs that others hold (shared cluster)."""
        deadline = time.monotonic() + timeout_s
        while not self.fits(need):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def __len__(self) -> int:
        return len(self.running)
