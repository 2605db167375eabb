"""Find and kill what a lost trial actor left running: every process that inherited its trial token.

The actor puts `SERVETUNE_TRIAL_TOKEN` in its environment before it starts the server, so the server,
and whatever the server starts (engine workers, even those in a new session), carry it in their
initial environment (/proc/PID/environ). The actor's own later `os.environ` change does not show
there, so the actor itself never matches. Run as a script, it is the watchdog of a `tune` that started
its own Ray cluster (watch_owner).
"""

from __future__ import annotations

import os
import signal
import sys
import time

TOKEN_ENV = "SERVETUNE_TRIAL_TOKEN"
OWNER_ENV = "SERVETUNE_RAY_OWNER"  # set by a `tune` that starts its own Ray cluster, see watch_owner


def processes_with_token(token: str, prefix: bool = False, env: str = TOKEN_ENV) -> list[int]:
    """Pids of this user's processes started with env=token (or a token starting with `token`)."""
    marker = f"{env}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                entries = handle.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if any(entry.startswith(marker) if prefix else entry == marker for entry in entries):
            found.append(int(name))
    return found


def reap(token: str, env: str = TOKEN_ENV) -> list[int]:
    """SIGKILL the processes carrying the token, and the process groups they lead; returns the pids found.
    A group is killed only when its leader carries the token, so no group of Ray's is ever hit."""
    pids = processes_with_token(token, env=env)
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def ray_processes_holding(folders: list[str]) -> list[int]:
    """Pids of this user's processes titled `ray::...` with a file open under one of `folders`."""
    prefixes = tuple(folder.rstrip("/") + "/" for folder in folders if folder)
    found = []
    for name in os.listdir("/proc") if prefixes else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                if not handle.read().startswith(b"ray::"):
                    continue
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}").startswith(prefixes):
                    found.append(int(name))
                    break
            except OSError:
                continue
    return found


def watch_owner(token: str) -> None:
    """Read folders (Ray session folders) from stdin, a pipe whose other end only the owner holds, until
    EOF; then SIGKILL what carries OWNER_ENV=token and the `ray::` processes holding files in those folders.

    However the owner ends (even SIGKILL), the kernel closes its end. Ray's fate sharing already takes
    its GCS and raylet along, but the raylet's agents then spend Ray's fixed 60 s trying to report the
    raylet's death to the dead GCS, one of them listening on a port all that time. Their process title
    overwrites their environment, so they are found by the session files they hold.
    """
    folders = [line.decode(errors="replace").rstrip("\n") for line in sys.stdin.buffer]
    for _ in range(50):  # until a pass finds nothing: a process may be starting while we kill
        pids = reap(token, env=OWNER_ENV)
        for pid in ray_processes_holding(folders):
            pids.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids:
            return
        time.sleep(0.1)


if __name__ == "__main__":
    watch_owner(sys.argv[1])
