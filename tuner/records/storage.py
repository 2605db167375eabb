"""Optuna storage from a `--storage` URL: any RDB URL (sqlite, postgresql, mysql) or `journal://PATH`,
Optuna's journal file (JournalStorage) that several machines can share on a network file system."""

from __future__ import annotations

import fcntl
import hashlib
import tempfile
import warnings
from pathlib import Path

import optuna

from tuner.errors import InputError
from tuner.redact import redact_text, redact_url

JOURNAL = "journal://"


def open_store(url: str, create: bool = True) -> optuna.storages.BaseStorage:
    """What optuna.create_study / load_study take as `storage`; any URL that cannot be used is an
    InputError naming it (password masked). Without `create`, a SQLite or journal file must exist."""
    try:
        with warnings.catch_warnings():  # SQLAlchemy's about the URL (ignored query arguments): not an error line
            warnings.simplefilter("ignore")
            return _open(url, create)
    except InputError as exc:
        exc.message = redact_text(exc.message, url)
        raise
    except Exception as exc:  # the driver's, SQLAlchemy's or the file system's own words, first line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InputError(f"cannot use the Optuna storage '{redact_url(url)}': {redact_text(reason, url)}",
                         field="storage") from None


def _open(url: str, create: bool) -> optuna.storages.BaseStorage:
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):])  # journal:///shared/optuna.log -> /shared/optuna.log
        if not str(path) or str(path) == ".":
            raise InputError(f"expected journal:///PATH/TO/FILE, got '{url}'", field="storage")
        _must_exist(path, create)
        from optuna.storages.journal import JournalFileBackend

        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return optuna.storages.RDBStorage(url)
    path = Path(parsed.database)
    _must_exist(path, create)
    path.parent.mkdir(parents=True, exist_ok=True)
    # two processes creating the same fresh file at once both create its tables: one fails
    # ("table ... already exists"); the first creates them under this lock, the second finds them.
    # The lock file lives in the temporary folder, not beside the store (which may be read-only)
    with open(_lock_path(path), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return optuna.storages.RDBStorage(url)


def _lock_path(store: Path) -> Path:
    folder = Path(tempfile.gettempdir()) / "servetune-store-locks"
    folder.mkdir(exist_ok=True)
    return folder / (hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:24] + ".lock")


def _must_exist(path: Path, create: bool) -> None:
    if not create and not path.exists():
        raise InputError(f"no Optuna store here: looked for {path.resolve()} (run from the folder that holds "
                         "it, or pass --storage)", field="storage")


def cluster_notes(storage_url: str, mlflow_uri: str | None) -> list[str]:
    """What to say when a study runs on a Ray cluster with stores only this machine can reach."""
    notes = []
    if storage_url.startswith("sqlite:"):
        notes.append(f"the Optuna study is a SQLite file on this machine ({storage_url}): only a `tune` run here "
                     "can use or resume it; to drive the study from several machines use --storage "
                     "postgresql://USER:PASS@HOST/DB or --storage journal:///SHARED/PATH/optuna.log")
    if mlflow_uri and (mlflow_uri.startswith("sqlite:") or mlflow_uri.startswith("file:") or "://" not in mlflow_uri):
        notes.append(f"MLflow logs to {redact_url(mlflow_uri)} on this machine; for a team's cluster use --mlflow-uri "
                     "http://MLFLOW-HOST:5000 (a `mlflow server`)")
    return notes
