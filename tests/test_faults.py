"""Faults injected into real trial servers, a real `tune` process and a real MLflow server.

Each test breaks something on purpose (kill -9, SIGSTOP, a simulator `--fault`, a killed `tune`, an MLflow
server that goes away) and checks that the failure is classified, that nothing measured is lost and that no
process or port is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc

from tuner.engines.base import Launch
from tuner.errors import InputError
from tuner.outcome import Outcome
from tuner.records.storage import open_store
from tuner.records.trial import records
from tuner.runner.trial import TrialOutcome, TrialSpec, execute_trial, scrub_secret
from tuner.space.knobs import load_space
from tuner.tracking.mlflow_log import _redact
from tuner.workload.request import TraceRequest

REPO = Path(__file__).resolve().parents[1]
TIME_SCALE = 20.0  # the simulator's clock runs this much faster than wall-clock
READY_LINE = "Application startup complete."


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def server_argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


class ServerWatch(threading.Thread):
    """Finds a trial's server by the pid file the runner writes, and acts on it `delay_s` after it is ready."""

    def __init__(self, trial_dir: Path, action, delay_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.trial_dir, self.action, self.delay_s = trial_dir, action, delay_s
        self.pid: int | None = None
        self.error: BaseException | None = None
        self.trial_over = threading.Event()

    def _ready(self) -> bool:
        log = self.trial_dir / "server.log"
        return (self.trial_dir / "server.pid").exists() and log.exists() and READY_LINE in log.read_text()

    def run(self) -> None:
        try:
            wait_for(lambda: self._ready() or self.trial_over.is_set(), 60, "the trial server to be ready")
            if not self._ready():
                return
            self.pid = int((self.trial_dir / "server.pid").read_text())
            time.sleep(self.delay_s)
            self.action(self.pid)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc


def trial_spec(tmp_path: Path, *sim_args: str, model: str = "tiny-llama", requests: int = 40,
               number: int = 0, host: str = "127.0.0.1") -> TrialSpec:
    """A simulated trial: `requests` small requests, 0.1 s of wall-clock apart."""
    space = load_space("sim")
    gap_s = 0.1 * TIME_SCALE  # trace time is the server's clock
    trace = [TraceRequest(arrival_s=i * gap_s, input_tokens=200, output_tokens=40) for i in range(requests)]
    launch = Launch(config=space.defaults(), model=model, baseline=True, host=host, time_scale=TIME_SCALE,
                    extra_args=("--startup-seconds", "2", "--max-model-len", "1024", *sim_args))
    return TrialSpec(number=number, engine="sim", space=space, launch=launch, requests=trace,
                     out_dir=tmp_path, startup_timeout_s=60, hang_timeout_s=1.0 * TIME_SCALE,
                     request_timeout_s=120)


def run_with(spec: TrialSpec, action=None, delay_s: float = 1.0) -> tuple[TrialOutcome, int]:
    """Run the trial (with `action(pid)` done to its server mid-replay); the outcome and the server's pid."""
    watch = ServerWatch(spec.out_dir / f"trial-{spec.number:04d}", action or (lambda pid: None), delay_s)
    watch.start()
    outcome = execute_trial(spec)
    watch.trial_over.set()
    watch.join(timeout=60)
    if watch.error is not None:
        raise watch.error
    assert watch.pid is not None, f"the server never got ready: {outcome.failure}: {outcome.message}"
    return outcome, watch.pid


def assert_clean_teardown(outcome: TrialOutcome, pid: int) -> None:
    assert outcome.port_released, "the trial's port is still taken"
    assert group_gone(pid), "a process of the server's process group survived the trial"


def measured_rows(outcome: TrialOutcome) -> tuple[int, int]:
    """(completed, failed) rows in the trial's requests.csv, which must agree with its summary."""
    import csv

    with open(outcome.rows_csv) as handle:
        rows = list(csv.DictReader(handle))
    completed = sum(1 for r in rows if not r["error"])
    assert (completed, len(rows) - completed) == (outcome.summary["completed"], outcome.summary["failed"])
    return completed, len(rows) - completed


# --- the trial server fails ------------------------------------------------------------------------

def test_server_killed_mid_replay_is_a_crash_and_what_was_measured_is_kept(tmp_path):
    outcome, pid = run_with(trial_spec(tmp_path), lambda pid: os.kill(pid, signal.SIGKILL))
    assert not outcome.ok and outcome.failure == Outcome.CRASH
    assert "during the replay" in outcome.message and "-9" in outcome.message
    completed, failed = measured_rows(outcome)
    assert completed >= 1 and failed >= 1  # requests before the kill are measured, the rest recorded as failed
    assert_clean_teardown(outcome, pid)


def test_stopped_server_is_a_hang_and_is_torn_down(tmp_path):
    outcome, pid = run_with(trial_spec(tmp_path), lambda pid: os.kill(pid, signal.SIGSTOP))
    assert not outcome.ok and outcome.failure == Outcome.HANG, outcome.message
    assert measured_rows(outcome)[0] >= 1
    assert_clean_teardown(outcome, pid)


def test_server_hanging_during_warm_up_is_a_hang_too(tmp_path):
    spec = trial_spec(tmp_path, "--fault", "hang-under-load", "--fault-after-requests", "1")
    spec.warmup_requests = 2  # the first request to arrive is a warm-up request
    outcome, pid = run_with(spec)
    assert not outcome.ok and outcome.failure == Outcome.HANG, outcome.message
    assert_clean_teardown(outcome, pid)


@pytest.mark.parametrize("fault, failure", [
    ("oom-under-load", Outcome.OOM_LOAD),
    ("crash-under-load", Outcome.CRASH),
    ("hang-under-load", Outcome.HANG),
])
def test_simulated_fault_under_load_is_classified(tmp_path, fault, failure):
    outcome, pid = run_with(trial_spec(tmp_path, "--fault", fault, "--fault-after-requests", "8"))
    assert not outcome.ok and outcome.failure == failure, (outcome.failure, outcome.message)
    assert measured_rows(outcome)[0] >= 1  # the requests before the fault were measured
    assert outcome.ready_s > 0
    assert_clean_teardown(outcome, pid)


@pytest.mark.parametrize("model, sim_args, failure, log_text", [
    ("tiny-llama", ("--fault", "crash-at-start"), Outcome.CRASH, "simulated fault: crash at start"),
    ("llama-3.1-70b", ("--gpu-memory-utilization", "0.5"), Outcome.OOM_STARTUP,
     "No available memory for the cache blocks"),
])
def test_start_up_failure_is_classified(tmp_path, model, sim_args, failure, log_text):
    spec = trial_spec(tmp_path, *sim_args, model=model)
    outcome = execute_trial(spec)
    pid = int((tmp_path / "trial-0000" / "server.pid").read_text())
    assert not outcome.ok and outcome.failure == failure
    assert outcome.ready_s == 0 and "before it was ready" in outcome.message
    assert log_text in outcome.log_tail
    assert_clean_teardown(outcome, pid)


def test_a_start_that_cannot_import_a_module_is_an_environment_failure_naming_it(tmp_path, monkeypatch):
    """vLLM's failure patterns on a real process whose import fails, as an engine install missing a module."""
    from dataclasses import dataclass

    from tuner.engines import registry
    from tuner.engines.vllm import VllmEngine

    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))

    @registry.register_engine("vllm-broken")
    @dataclass
    class BrokenInstall(VllmEngine):
        name: str = "vllm-broken"

        def program(self, launch: Launch) -> list[str]:
            return [launch.python, "-c", "import servetune_no_such_module"]

    space = load_space("vllm")
    spec = replace(trial_spec(tmp_path), engine="vllm-broken", space=space,
                   launch=Launch(config=space.defaults(), model="/models/none", baseline=True))
    outcome = execute_trial(spec)
    assert not outcome.ok and outcome.failure == Outcome.ENVIRONMENT, (outcome.failure, outcome.message)
    assert "cannot import servetune_no_such_module" in outcome.message
    assert "ModuleNotFoundError: No module named 'servetune_no_such_module'" in outcome.log_tail


# --- who can reach a trial server, and what is written down ------------------------------------------

def _http_status(url: str, key: str | None) -> int:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _probe_server(seen: list[dict]):
    def probe(pid: int) -> None:
        argv = server_argv(pid)
        host, port = (flag_value(argv, f) for f in ("--host", "--port"))
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if item)
        key = environ["SERVETUNE_API_KEY"]
        url = f"http://{host}:{port}/v1/models"
        seen.append({"host": host, "key": key, "on_argv": key in " ".join(argv),
                     "without_key": _http_status(url, None),
                     "wrong_key": _http_status(url, key + "x"), "with_key": _http_status(url, key),
                     "listening": [h for h in ("127.0.0.1", "127.0.0.3") if _connects(h, int(port))]})
    return probe


def _connects(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def test_trial_servers_bind_loopback_with_a_random_key_that_never_reaches_mlflow(tmp_path):
    seen: list[dict] = []
    outcomes = [run_with(trial_spec(tmp_path, requests=12, number=n), _probe_server(seen), delay_s=0.2)[0]
                for n in range(2)]
    assert all(o.ok for o in outcomes), [o.message for o in outcomes]
    assert [s["host"] for s in seen] == ["127.0.0.1", "127.0.0.1"]
    assert all(s["listening"] == ["127.0.0.1"] for s in seen)  # not on another address
    assert all((s["without_key"], s["wrong_key"], s["with_key"]) == (401, 401, 200) for s in seen)
    assert not any(s["on_argv"] for s in seen)  # `ps` shows argv to every user; the key is in the environment
    keys = [s["key"] for s in seen]
    assert keys[0] != keys[1] and all(len(k) >= 32 for k in keys)

    from mlflow.tracking import MlflowClient

    from tuner.tracking.mlflow_log import StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "servetune", "secrets", tmp_path / "mlflow-buffer.jsonl")
    for outcome in outcomes:
        tracker.log_trial(outcome.number, "sim", {}, outcome.command, "COMPLETE", outcome.summary,
                          outcome.engine_metrics, {}, None, "", [outcome.log_path, outcome.rows_csv])
    tracker.finish()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("servetune").experiment_id])
    assert len(runs) == 3
    logged = []
    for run in runs:
        logged += [*run.data.params.values(), *run.data.tags.values()]
        for artifact in client.list_artifacts(run.info.run_id):
            logged.append(Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))).read_text())
    assert any("tune sim-serve" in text for text in logged) and any("Application startup" in t for t in logged)
    assert not [key for key in keys for text in logged if key in text], "an API key reached MLflow"


def test_trial_server_binds_the_host_it_is_given(tmp_path):
    seen: list[dict] = []
    outcome, _ = run_with(trial_spec(tmp_path, requests=8, host="127.0.0.3"), _probe_server(seen), delay_s=0.2)
    assert outcome.ok, outcome.message
    assert seen[0]["host"] == "127.0.0.3" and seen[0]["listening"] == ["127.0.0.3"]


def test_secret_flags_are_redacted_and_others_are_not():
    argv = ["vllm", "serve", "m", "--api-key", "k1", "--api-key=k2", "--hf-token", "k3", "--hf_token=k4",
            "--max-num-batched-tokens", "8192", "--max-num-seqs", "64"]
    shown = " ".join(_redact(argv))
    assert not any(k in shown for k in ("k1", "k2", "k3", "k4"))
    assert "--max-num-batched-tokens 8192" in shown and "--max-num-seqs 64" in shown


def test_passwords_in_urls_and_unusable_tracking_uris(tmp_path):
    from tuner.tracking.mlflow_log import StudyTracker, redact_url

    assert redact_url("postgresql://tuner:pa55@db:5432/optuna") == "postgresql://tuner:***@db:5432/optuna"
    assert redact_url("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
    with pytest.raises(InputError, match="mlflow-uri"):
        StudyTracker("foo://bar", "servetune", "s", tmp_path / "buffer.jsonl")


def test_buffered_records_survive_a_half_written_line_and_go_to_mlflow_in_order(tmp_path):
    from mlflow.tracking import MlflowClient

    from tuner.tracking.mlflow_log import StudyTracker

    buffer = tmp_path / "mlflow-buffer.jsonl"
    buffer.write_text(json.dumps({"op": "study", "params": {"sampler": "tpe"}, "tags": {"simulated": "true"}}) + "\n"
                      + json.dumps({"op": "finish"}) + "\n" + '{"op": "tri')  # `tune` killed mid-write
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    StudyTracker(uri, "servetune", "half", buffer, say=lambda line: None)
    assert not buffer.exists()
    client = MlflowClient(uri)
    [parent] = client.search_runs([client.get_experiment_by_name("servetune").experiment_id])
    assert parent.data.params == {"sampler": "tpe"} and parent.data.tags["simulated"] == "true"
    assert parent.info.status == "FINISHED"


def test_scrub_secret_removes_every_occurrence_from_a_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"start\nargs: api_key='s3cr3t-key'\nno secret here\nBearer s3cr3t-key s3cr3t-key\n\xff\n")
    scrub_secret(log, "s3cr3t-key")
    assert log.read_bytes() == b"start\nargs: api_key='***'\nno secret here\nBearer *** ***\n\xff\n"
    assert not (tmp_path / "server.log.scrub").exists()


# --- the `tune` process itself is killed -------------------------------------------------------------

def _native_trace(path: Path, requests: int = 16, gap_s: float = 1.0) -> Path:
    path.write_text("".join(json.dumps({"arrival_s": i * gap_s, "input_tokens": 300, "output_tokens": 40}) + "\n"
                            for i in range(requests)))
    return path


def _tune_argv(trace: Path, out: Path, name: str, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuner", "--workload", str(trace), "--engine", "sim", "--gpus", "1",
            "--trials", str(trials), "--sim-time-scale", "10", "--engine-arg=--startup-seconds 2", "--seed", "3",
            "--out", str(out),
            "--study-name", name, *extra]


def _study(out: Path, name: str) -> optuna.Study:
    # open_store, as `tune` does: a fresh store's tables are created under its lock, so polling it
    # while `tune` creates it cannot make either fail ("UNIQUE constraint failed: alembic_version")
    return optuna.load_study(study_name=name, storage=open_store(f"sqlite:///{out / 'optuna.db'}"))


def _ran(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran on a server to an end (not rejected by a constraint, not interrupted)."""
    ran = {r.number for r in records(study) if r.state in ("COMPLETE", "FAIL", "PRUNED")
           and r.failure not in (Outcome.CONSTRAINT, Outcome.INTERRUPTED)}
    return [t for t in study.get_trials(deepcopy=False) if t.number in ran]


def _serving_trial(out: Path, name: str) -> tuple[int, int, list[str]] | None:
    """(trial number, server pid, its argv) of a RUNNING trial whose server is up, once another has finished."""
    if not (out / "optuna.db").exists():
        return None
    try:
        study = _study(out, name)
    except (KeyError, InputError, sqlalchemy.exc.SQLAlchemyError):  # `tune` is creating the store or the study
        return None
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not _ran(study) or not running:
        return None
    trial_dir = out / name / f"trial-{running[0].number:04d}"
    log = trial_dir / "server.log"
    if not (trial_dir / "server.pid").exists() or not log.exists() or READY_LINE not in log.read_text():
        return None
    pid = int((trial_dir / "server.pid").read_text())
    try:
        return running[0].number, pid, server_argv(pid)
    except OSError:  # the trial ended meanwhile
        return None


def _processes_mentioning(*words: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if all(word in argv for word in words):
            found.append(int(entry.name))
    return found


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1]) if entry.name.isdigit() else None
        except OSError:
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _listening_sockets(pids: list[int] | None = None) -> set[str]:
    """ADDRESS:PORT (hex, as /proc/net/tcp* writes them) of the TCP sockets these processes (all: None) listen on."""
    inodes = set()
    for pid in pids or []:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and (pids is None or fields[9] in inodes):  # 0A: LISTEN
                found.add(fields[1])
    return found


def _loopback(hex_address: str) -> bool:
    if len(hex_address) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return hex_address.endswith("7F")
    return hex_address == "00000000000000000000000001000000" or (
        hex_address.startswith("0000000000000000FFFF0000") and hex_address.endswith("7F"))  # ::1, ::ffff:127.x


def _gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def _group_dead(pgid: int) -> bool:
    """No live process in the group; killed orphans may wait a while for init to reap them."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, group = stat.read_text().rpartition(")")[2].split()[:3]
            if int(group) == pgid and state != "Z":
                return False
    return True


@pytest.mark.slow
def test_killed_tune_leaves_no_server_and_the_same_command_finishes_the_study(tmp_path):
    out = tmp_path / "runs"
    argv = _tune_argv(_native_trace(tmp_path / "trace.jsonl", requests=40), out, "killed", 3, "--no-mlflow",
                      "--host", "127.0.0.2")
    with open(tmp_path / "first.log", "w") as log:
        tune = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        number, server_pid, server = wait_for(lambda: _serving_trial(out, "killed"), 180,
                                              "a finished and a serving trial")
        assert flag_value(server, "--host") == "127.0.0.2"  # --host reaches the trial servers
        family = _descendants(tune.pid)  # tune, its local Ray cluster (GCS, raylet, agents, workers), the server
        listening = _listening_sockets(family)
        assert len(listening) >= 1 and all(_loopback(a.rpartition(":")[0]) for a in listening), listening
        actor_pid = int(Path(f"/proc/{server_pid}/stat").read_text().rpartition(")")[2].split()[1])
        before = {t.number: t.values for t in _ran(_study(out, "killed"))}
        os.kill(tune.pid, signal.SIGKILL)  # `tune` alone: the rest of its process group is left to it
        tune.wait()
        # the watchdog takes everything along at once; Ray's own agents would otherwise linger for 60 s
        wait_for(lambda: all(_gone_or_zombie(pid) for pid in family), 10, "every process `tune` started to die")
        assert not listening & _listening_sockets(), "a port of the killed `tune` is still listening"
    finally:
        if tune.poll() is None:
            os.killpg(tune.pid, signal.SIGKILL)
        tune.wait()
    assert _group_dead(server_pid) and _gone_or_zombie(actor_pid)
    assert not _processes_mentioning("sim-serve", "127.0.0.2"), "a trial server of the killed study survived"

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 interrupted trial(s) will run again" in again.stdout and "Pareto front" in again.stdout
    assert f"taking over the lock of study 'killed': its process (pid {tune.pid} on" in again.stdout
    study = _study(out, "killed")
    interrupted = study.trials[number]
    assert records(study)[number].failure == Outcome.INTERRUPTED
    assert any(t.params == interrupted.params for t in _ran(study) if t.number > number)  # run again
    assert {t.number: t.values for t in _ran(study) if t.number in before} == before  # kept as they were
    assert len(_ran(study)) == 3
    pids = [int(p.read_text()) for p in (out / "killed").glob("trial-*/server.pid")]
    assert len(pids) >= 3 and all(group_gone(pid) for pid in pids)


# --- the MLflow server goes away ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Gate:
    """A TCP forwarder on 127.0.0.1:`port` to `upstream`. Closed, it refuses connections and cuts the open
    ones, as a killed server does; open again, on the same port, it forwards again."""

    def __init__(self, port: int, upstream: int) -> None:
        self.port, self.upstream = port, upstream
        self.listener: socket.socket | None = None
        self.open_sockets: list[socket.socket] = []

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for sock in self.open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.open_sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self.open_sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class GatedMlflow:
    """conftest.py's real `mlflow server`, behind a gate that the test closes and opens: closed, its address
    refuses connections as a killed server's would; open again, on the same port, it serves again."""

    def __init__(self, server) -> None:
        self.server = server
        self.port, upstream = _free_port(), int(server.uri.rpartition(":")[2])
        self.gate = _Gate(self.port, upstream)
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server.wait_ready()
        self.gate.open()
        wait_for(lambda: _http_status(self.uri + "/health", None) == 200, 30, "mlflow server behind the gate")

    def stop(self) -> None:
        self.gate.close()
        wait_for(lambda: not _connects("127.0.0.1", self.port), 30, "mlflow server to stop")


class LineReader(threading.Thread):
    """Collects a subprocess's output lines so that the test can act when one appears."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line)

    def seen(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def _mlflow_trials(uri: str, study: str) -> dict[int, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("servetune")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`servetune.study` = '{study}'")
    assert [r.info.status for r in runs if r.data.tags["servetune.kind"] == "study"] == ["FINISHED"]
    trials = [r for r in runs if r.data.tags["servetune.kind"] == "trial"]
    assert len(trials) == len({r.data.tags["servetune.trial"] for r in trials}), "a trial was logged twice"
    return {int(r.data.tags["servetune.trial"]): r.data.tags["servetune.state"] for r in trials}


@pytest.mark.slow
def test_mlflow_outage_loses_nothing(tmp_path, mlflow_server):
    server = GatedMlflow(mlflow_server)
    server.start()
    out = tmp_path / "runs"
    buffer = out / "outage" / "mlflow-buffer.jsonl"
    argv = _tune_argv(_native_trace(tmp_path / "trace.jsonl", requests=10), out, "outage", 4,
                      "--mlflow-uri", server.uri)
    tune = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    reader = LineReader(tune.stdout)
    reader.start()

    def when_seen(text: str, what: str) -> None:
        wait_for(lambda: reader.seen(text) or tune.poll() is not None, 180, what)
        assert reader.seen(text), "".join(reader.lines)

    def while_tune_waits(action) -> None:  # `tune` paused, so that what follows happens mid-study
        os.kill(tune.pid, signal.SIGSTOP)
        try:
            action()
        finally:
            os.kill(tune.pid, signal.SIGCONT)

    try:
        # down after the first trial, back after the second: the records wait in the buffer, then go in
        when_seen("[1/4]", "the first trial")
        server.stop()
        when_seen("buffering to", "the outage to be noticed")
        while_tune_waits(server.start)
        when_seen("reachable again", "the buffered records to be written")
        # down again until the end: `tune` ends well and says where the records wait
        while_tune_waits(server.stop)
        assert tune.wait(timeout=300) == 0
        reader.join(timeout=10)
        output = "".join(reader.lines)
        assert f"are kept in {buffer}" in output and "Traceback" not in output, output
        assert buffer.exists() and '"op": "finish"' in buffer.read_text()

        # the next run of the study writes them first (what `tune` does when it opens its tracker)
        server.start()
        from tuner.tracking.mlflow_log import StudyTracker

        said: list[str] = []
        StudyTracker(server.uri, "servetune", "outage", buffer, say=said.append)
        assert not buffer.exists() and any("buffered by an earlier run" in line for line in said)
        in_optuna = {t.number: "COMPLETE" if t.state == optuna.trial.TrialState.COMPLETE else "FAIL"
                     for t in _ran(_study(out, "outage"))}
        assert len(in_optuna) == 4 and _mlflow_trials(server.uri, "outage") == in_optuna
    finally:
        if tune.poll() is None:
            tune.kill()
        server.gate.close()
