"""Find and kill what a lost trial actor left running: every process that inherited its trial token.

The actor puts `SERVETUNE_TRIAL_TOKEN` in its environment before it starts the server, so the server,
and whatever the server starts (engine workers, even those in a new session), carry it in their
initial environment (/proc/PID/environ). The actor's own later `os.environ` change does not show
there, so the actor itself never matches.
"""

from __future__ import annotations

import os
import signal

TOKEN_ENV = "SERVETUNE_TRIAL_TOKEN"


def processes_with_token(token: str, prefix: bool = False) -> list[int]:
    """Pids of this user's processes started with TOKEN_ENV=token (or a token starting with `token`)."""
    marker = f"{TOKEN_ENV}={token}".encode()
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


def reap(token: str) -> list[int]:
    """SIGKILL the processes carrying the token, and the process groups they lead; returns the pids found.
    A group is killed only when its leader carries the token, so no group of Ray's is ever hit."""
    pids = processes_with_token(token)
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
