"""MLflow: one parent run per study, one child run per trial, the Pareto front on the parent.

Every write goes through a buffer file first (JSON lines in the study's run directory) and is removed from
it once MLflow took it. When the MLflow server is unreachable the study goes on: records stay in the
buffer, are written in order at the next write that gets through, and a later `tune` of the same study
writes whatever is left. The Optuna storage holds every result either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuner.errors import InputError
from tuner.redact import redact_text, redact_url

SECRET_FLAG = re.compile(r"(^|[-_])(api[-_]?key|key|token|secret|password|passwd|credentials?)($|[-_])")
# the MLflow client retries a lost server for minutes by default; the buffer makes retrying pointless
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # not two "View run" lines per trial


def _clean_metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _is_secret_flag(arg: str) -> bool:
    return arg.startswith("-") and bool(SECRET_FLAG.search(arg.lstrip("-").partition("=")[0].lower()))


def _redact(argv: list[str]) -> list[str]:
    """The command with the values of secret-looking flags (`--api-key K`, `--hf-token=K`) replaced."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
        elif _is_secret_flag(arg) and "=" in arg:
            out.append(arg.partition("=")[0] + "=***")
        else:
            out.append(arg)
        hide_next = _is_secret_flag(arg) and "=" not in arg
    return out


def _first_line(exc: BaseException, url: str | None = None) -> str:
    return redact_text((str(exc).strip().splitlines() or [type(exc).__name__])[0][:200], url)


def _unreachable(exc: BaseException) -> bool:
    """A failure of the connection or of the server (worth retrying later), not a rejected record."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, MlflowException) and seen.get_http_status_code() >= 500:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def artifact_location(tracking_uri: str) -> str | None:
    """Beside a local SQLite store (`servetune-runs/mlartifacts/`), not `./mlruns` of whatever directory
    `tune` ran in; a tracking server keeps its own artifact root (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


class StudyTracker:
    def __init__(self, tracking_uri: str, experiment: str, study_name: str, buffer_path: Path,
                 say: Callable[[str], None] = print) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        for key, value in CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        try:
            self.client = MlflowClient(tracking_uri)
        except Exception as exc:  # an unknown scheme, a retired file store...
            raise InputError(f"cannot use {redact_url(tracking_uri)!r}: {_first_line(exc, self.tracking_uri)}",
                             field="mlflow-uri") from None
        self.experiment = experiment
        self.study_name = study_name
        self.buffer_path = buffer_path
        self.say = say
        self.down = False
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        if self.pending():
            self.say(f"mlflow: writing {self.pending()} record(s) buffered by an earlier run ({buffer_path})")
            self.flush()

    # --- the parent run, found or made once MLflow answers -----------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            existing = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = existing.experiment_id if existing else self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.tracking_uri))
        return self._experiment_id

    @property
    def parent_id(self) -> str:
        if self._parent_id is None:
            runs = self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.`servetune.study` = '{self.study_name}' and "
                                                         "tags.`servetune.kind` = 'study'", max_results=1)
            self._parent_id = runs[0].info.run_id if runs else self.client.create_run(
                self.experiment_id, run_name=self.study_name,
                tags={"servetune.study": self.study_name, "servetune.kind": "study"}).info.run_id
        return self._parent_id

    def _trial_runs(self, number: int | None = None) -> list:
        query = f"tags.`mlflow.parentRunId` = '{self.parent_id}'"
        if number is not None:
            query += f" and tags.`servetune.trial` = '{number}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=10000)

    def logged_trials(self) -> set[int]:
        return {int(r.data.tags["servetune.trial"]) for r in self._trial_runs() if "servetune.trial" in r.data.tags}

    # --- what the study logs: each call is one buffered record -------------------------------
    def log_study(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._submit("study", params={k: redact_url(str(v))[:6000] for k, v in params.items()}, tags=tags)

    def log_trial(self, number: int, engine: str, config: dict[str, Any], command: list[str], state: str,
                  summary: dict[str, Any], engine_metrics: dict[str, float], tags: dict[str, str],
                  failure: str | None, message: str, artifacts: list[str]) -> None:
        self._submit("trial", number=number, engine=engine, config=config, command=_redact(command),
                     state=state, summary=summary, engine_metrics=engine_metrics, tags=tags, failure=failure,
                     message=message, artifacts=[str(p) for p in artifacts if p])

    def log_study_artifacts(self, paths: list[Path], summary: dict[str, Any]) -> None:
        self._submit("study_artifacts", paths=[str(p) for p in paths], summary=summary)

    def log_text(self, text: str, name: str) -> None:
        self._submit("text", text=text, name=name)

    def finish(self) -> None:
        self._submit("finish")
        if self.pending():
            self.say(f"mlflow: {redact_url(self.tracking_uri)} is unreachable; {self.pending()} record(s) are kept in "
                     f"{self.buffer_path} and written by the next `tune` run of this study (all results are "
                     "in the Optuna storage)")

    # --- the buffer --------------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._read_buffer())

    def _read_buffer(self) -> list[dict]:
        try:
            text = self.buffer_path.read_text()
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # the half-written last line of a `tune` killed mid-write
                continue
        return records

    def _keep(self, records: list[dict]) -> None:
        if not records:
            self.buffer_path.unlink(missing_ok=True)
            return
        temporary = self.buffer_path.with_name(self.buffer_path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        os.replace(temporary, self.buffer_path)

    def _submit(self, op: str, **fields: Any) -> None:
        self.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.buffer_path, "a") as buffer:  # written down before MLflow is asked
            buffer.write(json.dumps({"op": op, **fields}, default=str) + "\n")
        self.flush()

    def flush(self) -> bool:
        """Write the buffered records in order; True when none is left."""
        records = self._read_buffer()
        for index, record in enumerate(records):
            try:
                getattr(self, f"_write_{record['op']}")(record)
            except Exception as exc:
                if _unreachable(exc):
                    self._keep(records[index:])
                    if not self.down:
                        self.down = True
                        reason = _first_line(exc, self.tracking_uri)
                        self.say(f"mlflow: {redact_url(self.tracking_uri)} unreachable ({reason}); "
                                 f"buffering to {self.buffer_path}, the study goes on")
                    return False
                self.say(f"mlflow: {record['op']} record rejected and skipped: {_first_line(exc, self.tracking_uri)}")
        self._keep([])
        if self.down:
            self.down = False
            self.say(f"mlflow: {redact_url(self.tracking_uri)} reachable again; "
                     f"{len(records)} buffered record(s) written")
        return True

    # --- writes, each safe to repeat ------------------------------------------------------------
    def _write_study(self, record: dict) -> None:
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.parent_id).data.params
        params = [Param(k, v) for k, v in record["params"].items() if k not in logged]  # params are immutable
        self.client.log_batch(self.parent_id, params=params,
                              tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])

    def _write_trial(self, record: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        for earlier in self._trial_runs(record["number"]):  # a write cut short left a partial run
            self.client.delete_run(earlier.info.run_id)
        failure = record["failure"]
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{record['number']}", tags={
            "mlflow.parentRunId": self.parent_id, "servetune.study": self.study_name,
            "servetune.trial": str(record["number"]), "servetune.kind": "trial", "servetune.state": record["state"],
            "engine": record["engine"], **record["tags"], **({"failure": failure} if failure else {})})
        run_id = run.info.run_id
        params = {**{f"knob.{k}": v for k, v in record["config"].items()},
                  "command": " ".join(record["command"])[:6000]}
        metrics = [Metric(_clean_metric_name(k), float(v), 0, 0) for k, v in record["summary"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        metrics += [Metric(_clean_metric_name(f"engine.{k}"), float(v), 0, 0)
                    for k, v in record["engine_metrics"].items()]
        message = record["message"]
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                              tags=[RunTag("failure_message", message[:5000])] if message else [])
        for path in record["artifacts"]:
            if Path(path).exists():
                self.client.log_artifact(run_id, path)
        self.client.set_terminated(run_id, status="FINISHED" if record["state"] == "COMPLETE" else "FAILED")

    def _write_study_artifacts(self, record: dict) -> None:
        for path in record["paths"]:
            if Path(path).exists():
                self.client.log_artifact(self.parent_id, path)
        for key, value in record["summary"].items():
            if isinstance(value, (int, float)):
                self.client.log_metric(self.parent_id, _clean_metric_name(key), float(value))

    def _write_text(self, record: dict) -> None:
        self.client.log_text(self.parent_id, record["text"], record["name"])

    def _write_finish(self, record: dict) -> None:
        self.client.set_terminated(self.parent_id, status="FINISHED")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
