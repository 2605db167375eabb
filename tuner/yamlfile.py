"""Reading a user's YAML file: a bad file is one line naming the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tuner.errors import InputError


def read_yaml(path: Path, what: str) -> tuple[str, Any]:
    """The file's text and its parsed content; `what` names the file in errors ("search space")."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", file=str(path)) from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise InputError(f"invalid YAML: {getattr(exc, 'problem', exc)}", file=str(path),
                         line=None if line is None else line + 1) from None
