"""Which flags the installed engine version has: probe `--help` once per version, cache it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tuner.space.knobs import SearchSpace

_FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9._-]*")


def cache_dir() -> Path:
    root = os.environ.get("SERVETUNE_CACHE") or Path.home() / ".cache" / "servetune"
    return Path(root) / "help"


def flags_in(help_text: str) -> set[str]:
    return {flag.rstrip(".") for flag in _FLAG.findall(help_text)}


def probe_help(engine: str, version: str, help_argv: list[str], timeout_s: float = 300) -> str:
    path = cache_dir() / f"{engine}-{version}.txt"
    if version != "unknown" and path.exists():
        return path.read_text()
    out = subprocess.run(help_argv, capture_output=True, text=True, timeout=timeout_s,
                         env={**os.environ, "COLUMNS": "200"})
    text = out.stdout + out.stderr
    if out.returncode == 0 and version != "unknown":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def drop_unsupported(space: SearchSpace, available: set[str]) -> list[str]:
    """Remove knobs whose flags this version lacks (and knobs conditioned on them); return notes."""
    notes = []
    for name, knob in list(space.knobs.items()):
        flags = [knob.json_flag] if knob.json_flag else []
        for spec in (knob.flag, knob.flag_off):
            if spec is not None:
                flags.append(spec if isinstance(spec, str) else spec[0])
        missing = [f for f in flags if f.startswith("--") and f not in available]
        if missing:
            del space.knobs[name]
            notes.append(f"knob '{name}' dropped: {space.engine} has no {', '.join(missing)} in this version")
    for name, knob in list(space.knobs.items()):
        if knob.when is not None and knob.when.knob not in space.knobs:
            del space.knobs[name]
            notes.append(f"knob '{name}' dropped: it depends on dropped '{knob.when.knob}'")
    space.notes.extend(notes)
    return notes
