"""Optuna storage from a `--storage` URL: any RDB URL (sqlite, postgresql, mysql) or `journal://PATH`,
Optuna's journal file (JournalStorage) that several machines can share on a network file system."""

from __future__ import annotations

from pathlib import Path

import optuna

from tuner.errors import InputError

JOURNAL = "journal://"


def open_storage(url: str) -> str | optuna.storages.BaseStorage:
    """What optuna.create_study / load_study take as `storage`."""
    if not url.startswith(JOURNAL):
        return url
    path = Path(url[len(JOURNAL):])  # journal:///shared/optuna.log -> /shared/optuna.log
    if not str(path) or str(path) == ".":
        raise InputError(f"expected journal:///PATH/TO/FILE, got '{url}'", field="storage")
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def cluster_notes(storage_url: str, mlflow_uri: str | None) -> list[str]:
    """What to say when a study runs on a Ray cluster with stores only this machine can reach."""
    notes = []
    if storage_url.startswith("sqlite:"):
        notes.append(f"the Optuna study is a SQLite file on this machine ({storage_url}): only a `tune` run here "
                     "can use or resume it; to drive the study from several machines use --storage "
                     "postgresql://USER:PASS@HOST/DB or --storage journal:///SHARED/PATH/optuna.log")
    if mlflow_uri and (mlflow_uri.startswith("sqlite:") or mlflow_uri.startswith("file:") or "://" not in mlflow_uri):
        notes.append(f"MLflow logs to {mlflow_uri} on this machine; for a team's cluster use --mlflow-uri "
                     "http://MLFLOW-HOST:5000 (a `mlflow server`)")
    return notes
