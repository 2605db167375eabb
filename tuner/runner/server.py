"""One engine server process: start it in its own process group, wait until ready, stop it cleanly."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
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


class ManagedServer:
    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.pid_path = log_path.parent / "server.pid"
        self.started_at = 0.0  # epoch seconds of the launch

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        parent_pid = os.getpid()
        self.started_at = time.time()
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
