"""Expensive parts shared by the tests: a local Ray cluster per test process (one per pytest-xdist worker),
and one real `mlflow server` for the whole run."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

# logical GPUs: a study takes the --gpus it asks for (TrialPool uses the smaller of --gpus and the cluster's)
RAY_GPUS = 8


@pytest.fixture(scope="session")
def _ray_until_the_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_until_the_end):
    """Ray with 8 logical GPUs. Its start costs 5 to 10 s on 2 cores, so a module finds the one an earlier
    module started; it starts again only where a test shut it down or a study started a smaller one."""
    import ray

    from tuner.runner.pool import init_ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= RAY_GPUS:
        return
    ray.shutdown()
    init_ray(None, gpus=RAY_GPUS)


# --- one real `mlflow server` for the whole run --------------------------------------------------------

@dataclass(frozen=True)
class MlflowServer:
    uri: str
    log: Path

    def wait_ready(self, timeout_s: float = 120) -> str:
        """The server's URI once /health answers (it starts in 15 to 40 s on 2 cores)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server not ready in {timeout_s:.0f} s:\n{self.log.read_text()[-2000:]}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store, started once for the run: the xdist
    workers share it (the first to need it starts it; the last one using it stops it), since its start costs
    as much CPU as a small study. Without MLflow's job executor: servetune uses no MLflow job, and it takes 8
    more processes. Its caller waits for it (`wait_ready`) only when it needs it, so it starts meanwhile."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "mlflow-server"
    root.mkdir(exist_ok=True)
    state_path, lock = root / "state.json", root / "lock"
    with _locked(lock):
        state = json.loads(state_path.read_text()) if state_path.exists() else {"users": 0}
        if not state["users"]:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            argv = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                    str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                    "--artifacts-destination", str(root / "artifacts")]
            with open(root / "server.log", "ab") as log:
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
            state = {"users": 0, "pid": process.pid, "port": port}
        state["users"] += 1
        state_path.write_text(json.dumps(state))
    yield MlflowServer(f"http://127.0.0.1:{state['port']}", root / "server.log")
    with _locked(lock):
        state = json.loads(state_path.read_text())
        state["users"] -= 1
        state_path.write_text(json.dumps(state))
        if not state["users"]:
            with suppress(ProcessLookupError):
                os.killpg(state["pid"], signal.SIGKILL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a `slow` test first, each module's tests kept together and in order: with
    `--dist worksteal`, a worker that runs out takes tests from the other's queue, so the run ends on short
    tests instead of one worker finishing a long study alone."""
    slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow)
