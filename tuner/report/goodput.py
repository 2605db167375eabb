"""Goodput of a finished trial under any SLO: the stored figure, or recomputed from its per-request rows."""

from __future__ import annotations

import csv
from pathlib import Path

from tuner.loadgen.metrics import RequestResult, summarize
from tuner.loadgen.slo import SLO
from tuner.records.pareto import Point

_INTS = {"index", "prompt_tokens", "output_tokens", "requested_output_tokens", "cached_tokens"}
_OPTIONAL = {"ttft_s", "tpot_s", "e2e_s", "cached_tokens", "error"}


def read_rows(path: Path) -> list[RequestResult]:
    """`requests.csv` as written by `tuner.loadgen.replay.write_results`."""
    rows = []
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            values: dict = {}
            for name, text in record.items():
                if name in _OPTIONAL and text == "":
                    values[name] = None
                elif name == "itl_s":
                    values[name] = [float(x) for x in text.split()]
                elif name == "error":
                    values[name] = text
                elif name in _INTS:
                    values[name] = int(text)
                else:
                    values[name] = float(text)
            rows.append(RequestResult(**values))
    return rows


def trial_rows_csv(run_dir: Path | None, number: int) -> Path | None:
    if run_dir is None:
        return None
    path = run_dir / f"trial-{number:04d}" / "requests.csv"
    return path if path.exists() else None


def goodput_under(slo: SLO | None, point: Point, run_dir: Path | None) -> float | None:
    """Requests per second meeting every target of `slo`; None without an SLO or without the rows."""
    if slo is None:
        return None
    if point.summary.get("slo") == str(slo):
        return point.summary.get("goodput")
    rows_csv = trial_rows_csv(run_dir, point.number)
    if rows_csv is None:
        return None
    return summarize(read_rows(rows_csv), float(point.summary["duration_s"]), slo).goodput
