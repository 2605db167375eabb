"""MLflow: one parent run per study, one child run per trial, the Pareto front on the parent."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

SECRET_WORDS = ("api_key", "api-key", "token", "secret", "password")


def _clean_metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _redact(argv: list[str]) -> list[str]:
    out, hide_next = [], False
    for arg in argv:
        out.append("***" if hide_next else arg)
        hide_next = any(word in arg.lower() for word in SECRET_WORDS) and arg.startswith("-")
    return out


class StudyTracker:
    def __init__(self, tracking_uri: str, experiment: str, study_name: str) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        existing = self.client.get_experiment_by_name(experiment)
        self.experiment_id = existing.experiment_id if existing else self.client.create_experiment(experiment)
        self.study_name = study_name
        self.parent_id = self._find_or_create_parent()

    def _find_or_create_parent(self) -> str:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`servetune.study` = '{self.study_name}' and "
                                                     "tags.`servetune.kind` = 'study'", max_results=1)
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                     tags={"servetune.study": self.study_name, "servetune.kind": "study"})
        return run.info.run_id

    def logged_trials(self) -> set[int]:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                                       max_results=10000)
        return {int(r.data.tags["servetune.trial"]) for r in runs if "servetune.trial" in r.data.tags}

    def log_study(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        for key, value in params.items():
            try:
                self.client.log_param(self.parent_id, key, str(value)[:6000])
            except Exception:  # a param is immutable once logged; a resumed study logs it again
                pass
        for key, value in tags.items():
            self.client.set_tag(self.parent_id, key, value)

    def log_trial(self, number: int, engine: str, config: dict[str, Any], command: list[str], state: str,
                  summary: dict[str, Any], engine_metrics: dict[str, float], tags: dict[str, str],
                  failure: str | None, message: str, artifacts: list[str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": self.parent_id, "servetune.study": self.study_name,
            "servetune.trial": str(number), "servetune.kind": "trial", "servetune.state": state,
            "engine": engine, **tags, **({"failure": failure} if failure else {})})
        run_id = run.info.run_id
        params = {**{f"knob.{k}": v for k, v in config.items()}, "command": " ".join(_redact(command))[:6000]}
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(_clean_metric_name(k), float(v), 0, 0) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        metrics += [Metric(_clean_metric_name(f"engine.{k}"), float(v), 0, 0) for k, v in engine_metrics.items()]
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                              tags=[RunTag("failure_message", message[:5000])] if message else [])
        for path in artifacts:
            if path and Path(path).exists():
                self.client.log_artifact(run_id, path)
        self.client.set_terminated(run_id, status="FINISHED" if state == "COMPLETE" else "FAILED")
        return run_id

    def log_study_artifacts(self, paths: list[Path], summary: dict[str, Any]) -> None:
        for path in paths:
            if path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        for key, value in summary.items():
            if isinstance(value, (int, float)):
                self.client.log_metric(self.parent_id, _clean_metric_name(key), float(value))

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.parent_id, text, name)

    def finish(self) -> None:
        self.client.set_terminated(self.parent_id, status="FINISHED")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
