"""One engine server process: start it in its own process group (cold, or forked from a fork server that
preloaded the engine), wait until ready, stop it cleanly."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tuner.engines.base import ServerSpec
from tuner.outcome import Outcome

_PR_SET_PDEATHSIG = 1


class ServerFailed(Exception):
    def __init__(self, failure: str, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _die_with_parent(parent_pid: int) -> None:
    """In the child: be killed if the process that started us (the trial actor) dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class ForkServer:
    """Where a fork server (tuner/runner/forkserver.py) listens and which interpreter it forks; travels
    with each trial to its actor."""

    python: str
    folder: str

    @property
    def socket_path(self) -> str:
        return os.path.join(self.folder, "socket")


@dataclass(frozen=True)
class RunningForkServer:
    """The process behind a ForkServer, held by the `tune` that started it."""

    address: ForkServer
    process: subprocess.Popen

    def close(self) -> None:
        """Stop forking; servers it forked end with their own requesters (their lifelines)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.address.folder, ignore_errors=True)


def start_fork_server(python: str, modules: tuple[str, ...], log_path: Path) -> RunningForkServer:
    """Start a fork server that preloads `modules` with `python`; it dies with this process."""
    folder = tempfile.mkdtemp(prefix="servetune-fork-")  # private (0700); short enough for a socket path
    script = str(Path(__file__).with_name("forkserver.py"))
    parent_pid = os.getpid()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([python, script, folder, *modules], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=lambda: _die_with_parent(parent_pid))
    Path(folder, "pid").write_text(f"{process.pid}\n")  # requesters stop waiting when this process is gone
    return RunningForkServer(ForkServer(python=python, folder=folder), process)


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ForkedProcess:
    """What Popen offers the runner (pid, poll, wait, returncode) for a server the fork server started.

    It holds the server's lifeline: closing it (or this process ending) makes the server kill its group."""

    def __init__(self, pid: int, exit_path: Path, lifeline: socket.socket) -> None:
        self.pid = pid
        self.exit_path = exit_path
        self.lifeline: socket.socket | None = lifeline
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self.exit_path.read_text())
            except (OSError, ValueError):
                if not _pid_running(self.pid) and not self.exit_path.exists():
                    time.sleep(0.6)  # the fork server reaps every 0.25 s
                    try:
                        self.returncode = int(self.exit_path.read_text())
                    except (OSError, ValueError):
                        self.returncode = -signal.SIGKILL  # reaped by another (its fork server ended first)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        if self.lifeline is not None:
            self.lifeline.close()
            self.lifeline = None


def fork_from(server: ForkServer, argv: list[str], env: dict[str, str], log_path: Path,
              wait_s: float) -> ForkedProcess | None:
    """Ask the fork server for `python -m module args` (argv as a cold start would run it); None when the
    fork server cannot (another interpreter, not `-m`, not running here, it failed to preload)."""
    if argv[:1] != [server.python] or argv[1:2] != ["-m"] or len(argv) < 3:
        return None
    deadline = time.monotonic() + wait_s
    while not os.path.exists(server.socket_path):  # still importing
        try:
            alive = _pid_running(int(Path(server.folder, "pid").read_text()))
        except (OSError, ValueError):  # not on this machine, or closed
            alive = False
        if not alive or time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
    exit_path = log_path.with_name(log_path.name + ".exit")
    exit_path.unlink(missing_ok=True)
    request = {"module": argv[2], "args": argv[3:], "env": env, "cwd": os.getcwd(), "log": str(log_path),
               "exit": str(exit_path)}
    lifeline = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lifeline.settimeout(30)
        lifeline.connect(server.socket_path)
        lifeline.sendall(json.dumps(request).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = lifeline.recv(4096)
            if not chunk:
                raise OSError("the fork server closed the connection")
            answer += chunk
        pid = int(json.loads(answer)["pid"])
    except (OSError, ValueError, KeyError):
        lifeline.close()
        return None
    return ForkedProcess(pid, exit_path, lifeline)


class ManagedServer:
    def __init__(self, spec: ServerSpec, log_path: Path, fork_server: ForkServer | None = None,
                 fork_wait_s: float = 300.0) -> None:
        self.spec = spec
        self.log_path = log_path
        self.process: subprocess.Popen | ForkedProcess | None = None
        self.pid_path = log_path.parent / "server.pid"
        self.started_at = 0.0  # epoch seconds of the launch
        self.fork_server = fork_server  # tune starts one only for an engine with preload_modules
        self.fork_wait_s = fork_wait_s  # how long a first server may wait for the fork server's preload
        self.forked = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        parent_pid = os.getpid()
        self.started_at = time.time()
        if self.fork_server is not None:
            self.process = fork_from(self.fork_server, self.spec.argv, env, self.log_path, self.fork_wait_s)
            self.forked = self.process is not None
        if self.process is None:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(self.spec.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True,
                                                preexec_fn=lambda: _die_with_parent(parent_pid))
        # the pid is the process group id too (new session); tests and operators find the server by it
        self.pid_path.write_text(f"{self.process.pid}\n")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _health(self) -> int | None:
        request = urllib.request.Request(self.spec.url + self.spec.health_path)
        if self.spec.api_key:
            request.add_header("Authorization", f"Bearer {self.spec.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def wait_ready(self, timeout_s: float, poll_s: float = 0.25) -> float:
        """Seconds until /health answered 200; ServerFailed if the process dies or time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive():
                raise ServerFailed(Outcome.CRASH, f"server exited with code {self.returncode} "
                                                  "before it was ready")
            if self._health() == 200:
                return time.monotonic() - started
            time.sleep(poll_s)
        raise ServerFailed(Outcome.STARTUP_TIMEOUT, f"server not ready after {timeout_s:.0f} s")

    @property
    def returncode(self) -> int | None:
        """The exit code; None while the process runs or before `start()`."""
        return None if self.process is None else self.process.returncode

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the whole process group, then SIGKILL; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGCONT)  # a stopped (hung) server cannot act on SIGTERM
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # children the leader left behind
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        if isinstance(self.process, ForkedProcess):
            self.process.close()
        return self.process.returncode

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None  # stop() returned before this when never started
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait_port_released(self, host: str, port: int, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if port_is_free(host, port):
                return True
            time.sleep(0.2)
        return False

    def log_text(self, max_bytes: int = 1024 * 1024) -> str:
        """The end of the server log; engines print a failure's root cause far above the last line."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - max_bytes))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text(64 * 1024).splitlines()[-lines:])
