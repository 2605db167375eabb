"""One live `tune` per study: a lock kept in the Optuna storage itself (a study user attribute), so it
holds for SQLite, PostgreSQL/MySQL and journal stores, across machines.

The holder refreshes a heartbeat; a lock whose holder is a dead process on this host, or whose heartbeat
is older than STALE_S, is taken over with a note. Storages have no compare-and-set, so a taker writes its
token, waits SETTLE_S and reads it back: of two takers at the same moment the later write wins and the
other is refused.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import optuna

from tuner.errors import InputError
from tuner.metrics import Direction

KEY = "servetune:lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats
SETTLE_S = 0.5


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    token: str
    since: float
    heartbeat: float

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.since, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"pid {self.pid} on {self.host}, since {since}"

    def stale(self, now: float) -> str | None:
        """Why this holder is gone, or None while it may be alive."""
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"its process ({self.describe()}) is gone"
        if now - self.heartbeat > STALE_S:
            return f"its holder ({self.describe()}) has not been heard of for {(now - self.heartbeat) / 60:.0f} min"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


class StudyLock:
    """Held from `acquire` until `release`; a daemon thread keeps the heartbeat fresh."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str, holder: Holder) -> None:
        self.storage, self.study_name, self.holder = storage, study_name, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="servetune-study-lock", daemon=True)

    @classmethod
    def acquire(cls, storage: optuna.storages.BaseStorage, study_name: str,
                directions: Sequence[optuna.study.StudyDirection | Direction],
                say: Callable[[str], None] = print) -> StudyLock:
        study = optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                                    load_if_exists=True)
        current = _read(storage, study_name)
        now = time.time()
        if current is not None:
            why = current.stale(now)
            if why is None:
                raise InputError(f"study '{study_name}' is being run by another `tune` ({current.describe()}); "
                                 "wait for it to finish, stop it, or use another --study-name", field="study-name")
            say(f"note: taking over the lock of study '{study_name}': {why}")
        mine = Holder(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex, since=now, heartbeat=now)
        study.set_user_attr(KEY, asdict(mine))
        time.sleep(SETTLE_S)
        winner = _read(storage, study_name)
        if winner is None or winner.token != mine.token:
            raise InputError(f"study '{study_name}' was just taken by another `tune` "
                             f"({winner.describe() if winner else 'unknown'}); use another --study-name",
                             field="study-name")
        lock = cls(storage, study_name, mine)
        lock._thread.start()
        return lock

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.refresh()
            except Exception:  # a storage hiccup: the next beat tries again, STALE_S allows ten misses
                continue

    def refresh(self) -> None:
        current = _read(self.storage, self.study_name)
        if current is None or current.token == self.holder.token:
            self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            _study(self.storage, self.study_name).set_user_attr(KEY, asdict(self.holder))

    def release(self) -> None:
        self._stop.set()
        current = _read(self.storage, self.study_name)
        if current is not None and current.token == self.holder.token:
            _study(self.storage, self.study_name).set_user_attr(KEY, {})

    def __enter__(self) -> StudyLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _study(storage: optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler())


def _read(storage: optuna.storages.BaseStorage, study_name: str) -> Holder | None:
    value = _study(storage, study_name).user_attrs.get(KEY)
    if not value:
        return None
    try:
        return Holder(**value)
    except TypeError:  # written by another version: treat as a holder long gone
        return None
