"""Why a trial did not complete normally: the failure classes and the early-stop kinds, in one vocabulary.

Members are strings (`Outcome.CRASH == "crash"`, `str(Outcome.CRASH) == "crash"`), so the values
stored in a study are plain strings and stores written before this enum load unchanged.
"""

from __future__ import annotations

import re
from enum import Enum


class Outcome(str, Enum):
    # a server that failed; later stages learn the infeasible region from these
    OOM_STARTUP = "oom_startup"
    OOM_LOAD = "oom_under_load"
    INVALID_CONFIG = "invalid_config"
    UNSUPPORTED = "unsupported"
    ENVIRONMENT = "environment"  # the engine's install lacks a module: the config is not at fault
    CRASH = "crash"
    HANG = "hang"
    STARTUP_TIMEOUT = "startup_timeout"
    REQUEST_ERRORS = "request_errors"
    LOST = "lost"  # the actor or node died under the trial
    INTERRUPTED = "interrupted"  # the study was stopped while the trial ran
    # proposals that never launched
    CONSTRAINT = "constraint"
    PREDICTED_INFEASIBLE = "predicted_infeasible"
    # trials stopped early by a replay watcher
    SLO_LOST = "slo_lost"
    DOMINATED = "dominated"
    SCREENED_OUT = "screened_out"

    def __str__(self) -> str:
        return self.value


_MISSING_MODULE = re.compile(r"(?:ModuleNotFoundError|ImportError): (?:No module named '?([\w.]+)'?|"
                             r"cannot import name '?\w+'? from '?([\w.]+)'?)")


def missing_module(log: str) -> str | None:
    """The module whose import failed, from the last such error of a log (None: none)."""
    found = _MISSING_MODULE.findall(log)
    return next((name for name in found[-1] if name), None) if found else None
