"""Scale: trials of mixed sizes packed on logical GPUs, lost actors re-queued once, a two-node cluster.

Real parts throughout: a local Ray cluster with logical GPUs, the simulated engine, Optuna storages,
and for the two-node test a head and a second raylet started with `ray start` on this machine.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import ray

from tuner.cli import main
from tuner.errors import InputError
from tuner.export.command import load_study
from tuner.records.objectives import Objectives
from tuner.records.storage import cluster_notes, open_store
from tuner.runner.placement import nvlink_order
from tuner.runner.reaper import TOKEN_ENV, processes_with_token, reap

WORKLOAD = Path(__file__).parents[1] / "workloads" / "mooncake_conversation_head300.jsonl"
RAY = str(Path(sys.executable).parent / "ray")

SPACE = """\
engine: sim
extends: common.yaml
knobs:
  tensor_parallel_size: {flag: --tensor-parallel-size, choices: [1, 2, 4]}
  max_num_seqs: {flag: --max-num-seqs, type: categorical, choices: [16, 32, 64, 128], default: 256}
"""


def _space(tmp_path: Path) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return str(path)


def _tune(tmp_path: Path, name: str, *extra: str) -> int:
    return main(["--workload", str(WORKLOAD), "--rows", "16", "--time-scale", "3", "--engine", "sim",
                 "--study-name", name, "--out", str(tmp_path / "runs"), "--no-mlflow", "--seed", "3",
                 "--space", _space(tmp_path), *extra])


def _enqueue(storage: str, name: str, tensor_parallel: list[int]) -> None:
    """Create the study with these trials queued first (open_study then adds no baseline)."""
    study = optuna.create_study(study_name=name, storage=storage, directions=Objectives().directions)
    for i, tp in enumerate(tensor_parallel):
        study.enqueue_trial({"tensor_parallel_size": tp, "max_num_seqs": [16, 32, 64, 128][i % 4]},
                            skip_if_exists=False)


def _eventually(condition, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return condition()


# --- pieces without Ray -------------------------------------------------------------------------

def test_nvlink_order_groups_tensor_parallel_ranks_on_nvlink_pairs():
    pairs = {0: {1}, 1: {0}, 2: {3}, 3: {2}}
    assert nvlink_order([0, 2, 1, 3], pairs, 2) == ([0, 1, 2, 3], True)
    assert nvlink_order([0, 2], pairs, 2) == ([0, 2], False)  # Ray gave two GPUs of different pairs
    full = {i: {j for j in range(4) if j != i} for i in range(4)}  # NVSwitch: every GPU a peer
    assert nvlink_order([3, 1, 0, 2], full, 4) == ([0, 1, 2, 3], True)
    assert nvlink_order([1, 0], {}, 1)[0] == [0, 1]


def test_reaper_kills_every_process_carrying_the_token_and_nothing_else(tmp_path):
    token = f"test/{secrets.token_hex(6)}"
    env = {**os.environ, TOKEN_ENV: token}
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    # a server-like leader in its own session with a child in the same group, and a grandchild that
    # escaped into a session of its own: all carry the token
    script = ("import subprocess, sys, time; s = [sys.executable, '-c', 'import time; time.sleep(300)'];"
              "subprocess.Popen(s); subprocess.Popen(s, start_new_session=True); time.sleep(300)")
    leader = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    bystander = subprocess.Popen(sleeper, start_new_session=True)
    try:
        assert len(_eventually(lambda: len(processes_with_token(token)) == 3 and processes_with_token(token),
                               timeout_s=30)) == 3
        assert processes_with_token("test/", prefix=True)
        assert sorted(reap(token))
        leader.wait(timeout=10)
        assert _eventually(lambda: processes_with_token(token) == [], timeout_s=10)
        assert bystander.poll() is None
    finally:
        for process in (leader, bystander):
            process.kill()
            process.wait()


def test_storage_urls_and_cluster_notes(tmp_path):
    journal = tmp_path / "shared" / "optuna.log"
    storage = open_store(f"journal://{journal}")
    study = optuna.create_study(study_name="j", storage=storage, directions=["maximize"])
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert journal.exists()
    again = optuna.load_study(study_name="j", storage=open_store(f"journal://{journal}"))
    assert len(again.trials) == 2
    with pytest.raises(InputError, match="'postgresql://u@db/optuna': Failed to import DB access module"):
        open_store("postgresql://u@db/optuna")  # opened at once: no driver here, one line before anything runs
    with pytest.raises(InputError, match="journal:///PATH"):
        open_store("journal://")
    notes = " ".join(cluster_notes("sqlite:///x/optuna.db", "sqlite:///x/mlflow.db"))
    assert "postgresql://" in notes and "journal:///" in notes and "mlflow server" in notes
    assert cluster_notes("postgresql://u@db/optuna", "http://mlflow:5000") == []


# --- a local Ray cluster with 8 logical GPUs (conftest.py's local_ray) -----------------------------

@pytest.mark.slow
def test_the_watchdogs_mark_is_on_the_local_cluster_only(local_ray):
    from tuner.runner import pool
    from tuner.runner.reaper import OWNER_ENV

    # what this process starts itself (a test's MLflow server, another `tune`) is not the cluster's to kill
    assert OWNER_ENV not in os.environ
    token = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get(OWNER_ENV)).remote())
    marked = processes_with_token(token, env=OWNER_ENV)
    names = {Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].rsplit(b"/", 1)[-1] for pid in marked}
    assert {b"gcs_server", b"raylet"} <= names, names
    watchdog = pool._watchdog
    assert watchdog is not None and watchdog.poll() is None
    assert os.getsid(watchdog.pid) == watchdog.pid  # its own session: a Ctrl-C to our group spares it


def _ran(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if "started_at" in t.user_attrs]


@pytest.mark.slow
def test_mixed_sizes_share_the_gpus(tmp_path, local_ray, capsys):
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    (tmp_path / "runs").mkdir()
    # TP 4 and 1 launch; the next TP 4 does not fit the 3 GPUs left, so the three TP 1 trials proposed
    # after it fill them instead of waiting (the old loop sat idle here), and it runs when 4 free up
    _enqueue(storage, "pack", [4, 1, 4, 1, 1, 1])
    assert _tune(tmp_path, "pack", "--gpus", "8", "--trials", "6", "--sim-time-scale", "6") == 0
    out = capsys.readouterr().out
    assert "GPU utilisation" in out
    trials = _ran(load_study("pack", storage))
    assert [t.user_attrs["gpus"] for t in trials] == [4, 1, 4, 1, 1, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    by_number = {t.number: t.user_attrs for t in trials}

    def overlapping(a: dict, b: dict) -> bool:
        return a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]

    # the three TP 1 trials proposed after the waiting TP 4 one were launched before it (the old loop
    # held them back until a TP 4 trial had finished), and it waited for a trial to end
    launched = sorted(by_number, key=lambda n: by_number[n]["launched_at"])
    assert launched == [0, 1, 3, 4, 5, 2]
    assert by_number[2]["launched_at"] >= min(by_number[n]["ended_at"] for n in (0, 1, 3, 4, 5))
    # and at no moment did the trials running together hold more than 8 GPUs, or the same GPU twice
    for a, b in itertools.combinations(by_number.values(), 2):
        if overlapping(a, b):
            assert not set(a["gpu_ids"]) & set(b["gpu_ids"])
    for t in by_number.values():
        at = t["started_at"]
        assert sum(u["gpus"] for u in by_number.values() if u["started_at"] <= at < u["ended_at"]) <= 8
    campaign = json.loads((tmp_path / "runs" / "pack" / "campaign.json").read_text())
    assert campaign["gpus"] == 8 and len(campaign["spans"]) == 6 and 0 < campaign["utilisation"] < 1
    assert (tmp_path / "runs" / "pack" / "schedule.png").stat().st_size > 5000


@pytest.mark.slow
def test_killed_actor_is_requeued_once_then_failed_and_leaves_no_server(tmp_path, local_ray, capsys):
    name = f"lost-{secrets.token_hex(3)}"
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    prefix = f"servetune:{name}:trial-"
    killed: dict[int, list[int]] = {}

    def kill_when_serving(number: int) -> None:
        servers = _eventually(lambda: processes_with_token(f"{prefix}{number}/", prefix=True), timeout_s=120)
        assert servers, f"trial {number} never started a server"
        killed[number] = servers
        ray.kill(ray.get_actor(f"{prefix}{number}"))

    def killer() -> None:
        kill_when_serving(0)
        again = _eventually(lambda: [t.number for t in load_study(name, storage).trials
                                     if t.user_attrs.get("requeued_from") == 0
                                     and t.state == optuna.trial.TrialState.RUNNING], timeout_s=120)
        kill_when_serving(again[0])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    # the killer strikes as soon as the server process exists, well before the trial ends
    assert _tune(tmp_path, name, "--gpus", "1", "--trials", "2", "--sim-time-scale", "10",
                 "--fix", "tensor_parallel_size=1") == 0
    thread.join(timeout=30)
    out = capsys.readouterr().out
    study = load_study(name, storage)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["failure"] == "lost"
    assert first.user_attrs["requeued"] is True and "queued to run again" in first.user_attrs["message"]
    message = first.user_attrs["message"]
    assert message.startswith("trial actor lost (") and "killed by `ray.kill`" in message
    retry = next(t for t in study.trials if t.user_attrs.get("requeued_from") == 0)
    assert retry.params == first.params and retry.user_attrs.get("baseline") is True
    assert retry.state == optuna.trial.TrialState.FAIL and retry.user_attrs["failure"] == "lost"
    assert "lost twice, not retried" in retry.user_attrs["message"]
    assert not any(t.user_attrs.get("requeued_from") == retry.number for t in study.trials)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 1  # the study still ran its 2 trials: one lost for good, one measured
    assert "trial actor lost" in out
    # no server outlived its actor: the process group went with it
    assert len(killed) == 2
    for number, pids in killed.items():
        assert _eventually(lambda: processes_with_token(f"{prefix}{number}/", prefix=True) == [],  # noqa: B023
                           timeout_s=15)  # (waited on in this iteration)
        assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# --- two nodes on this machine: a head and a second raylet, both started with `ray start` ----------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _cluster_pids(temp_dir: str) -> set[int]:
    """Processes of the cluster under temp_dir: those naming it, and their descendants (Ray's agents
    rename themselves `ray::...`)."""
    parent, named = {}, set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                if temp_dir.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    named.add(int(name))
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parent[int(name)] = int(fields[1])
    found, grew = named & set(parent), True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def _stop_cluster(temp_dir: str) -> None:
    """Stop this test's Ray processes by pid (`ray stop` would stop every Ray on the machine)."""
    pids: set[int] = set()  # kept: an agent whose raylet died is reparented and named no more
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        pids |= _cluster_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if _eventually(lambda: all(_zombie(pid) for pid in pids), timeout_s=grace_s):  # noqa: B023 (this iteration)
            return


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # for processes that join it
    worker_dir: str  # the second node's temp dir: its processes name it


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a worker raylet on this machine, each with 1 logical GPU, token authentication on; one
    cluster for the module (about 15 s to start), so the test that kills its second node comes last."""
    head_dir, worker_dir = (f"/tmp/st-{secrets.token_hex(3)}" for _ in range(2))  # short: socket paths
    gcs, dashboard, *agent_ports = _free_ports(6)
    # a node that stops answering is declared dead after ~5 s instead of ~30 s
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
    common = ["--num-cpus", "2", "--num-gpus", "1", "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--port", str(gcs), "--include-dashboard", "false", "--dashboard-port",
            str(dashboard), "--temp-dir", head_dir, "--dashboard-agent-listen-port", str(agent_ports[0]),
            "--metrics-export-port", str(agent_ports[1]), *common]
    worker = [RAY, "start", "--address", f"127.0.0.1:{gcs}", "--temp-dir", worker_dir,
              "--dashboard-agent-listen-port", str(agent_ports[2]), "--metrics-export-port", str(agent_ports[3]),
              *common]
    try:
        for argv in (head, worker):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        yield Cluster(f"127.0.0.1:{gcs}", env, worker_dir)
    finally:
        for temp_dir in (worker_dir, head_dir):
            _stop_cluster(temp_dir)
            subprocess.run(["rm", "-rf", temp_dir], check=False)


def _tune_on(cluster: Cluster, tmp_path: Path, name: str, storage: str, *extra: str) -> subprocess.Popen:
    """`tune` as users run it, in its own process: Ray reads RAY_AUTH_MODE when it is imported."""
    return subprocess.Popen([sys.executable, "-m", "tuner", "--workload", str(WORKLOAD), "--rows", "16",
                             "--time-scale", "3", "--engine", "sim", "--study-name", name, "--out",
                             str(tmp_path / "runs"), "--no-mlflow", "--space", _space(tmp_path), "--gpus", "2",
                             "--ray-address", cluster.address, "--storage", storage, *extra],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.serial
def test_study_on_a_two_node_cluster_uses_both_nodes(tmp_path, two_node_cluster):
    journal = tmp_path / "shared" / "optuna.log"
    storage = f"journal://{journal}"
    # a TP=2 trial cannot have its 2 GPUs on one node here, though 2 are free in all: it is refused
    study = optuna.create_study(study_name="two", storage=open_store(storage), directions=Objectives().directions)
    for tp, seqs in ((1, 16), (2, 16), (1, 32), (1, 64)):
        study.enqueue_trial({"tensor_parallel_size": tp, "max_num_seqs": seqs})
    process = _tune_on(two_node_cluster, tmp_path, "two", storage, "--trials", "3", "--sim-time-scale", "10")
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-4000:]
    assert "on 2 GPU(s) of 2 nodes" in out
    study = optuna.load_study(study_name="two", storage=open_store(storage))
    ran = _ran(study)
    assert [t.params["tensor_parallel_size"] for t in ran] == [1, 1, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ran)
    assert len({t.user_attrs["node"] for t in ran}) == 2
    refused = study.trials[1]
    assert refused.user_attrs["failure"] == "constraint"
    assert "must share one node; the largest node has 1" in refused.user_attrs["message"]


@pytest.mark.slow
@pytest.mark.serial
def test_lost_node_mid_trial_requeues_its_trial_on_the_other_node(tmp_path, two_node_cluster):
    storage = f"journal://{tmp_path / 'shared' / 'optuna.log'}"
    prefix = "servetune:node-loss:trial-"
    # the node dies under running trials: both servers are up (the kill comes before they can finish)
    process = _tune_on(two_node_cluster, tmp_path, "node-loss", storage, "--trials", "2", "--sim-time-scale", "5",
                       "--fix", "tensor_parallel_size=1")
    try:
        servers = _eventually(lambda: len(processes_with_token(prefix, prefix=True)) >= 2, timeout_s=180)
        assert servers, "two trials never served at once"
        raylet = [pid for pid in _cluster_pids(two_node_cluster.worker_dir)
                  if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"raylet")]
        assert len(raylet) == 1
        os.kill(raylet[0], signal.SIGKILL)  # the second node is gone; what it ran must die with it
        out, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, out[-4000:]
    assert "trial actor lost" in out
    study = optuna.load_study(study_name="node-loss", storage=open_store(storage))
    lost = [t for t in study.trials if t.user_attrs.get("failure") == "lost"]
    assert len(lost) == 1 and lost[0].user_attrs["requeued"] is True
    retry = next(t for t in study.trials if t.user_attrs.get("requeued_from") == lost[0].number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost[0].params
    assert retry.user_attrs["node"] != lost[0].user_attrs["node"]  # elsewhere: the head
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    assert _eventually(lambda: processes_with_token(f"{prefix}{lost[0].number}/", prefix=True) == [],
                       timeout_s=30)
