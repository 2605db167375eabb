"""The recommended serve command of a study, as a shell line or a config file."""

from __future__ import annotations

import shlex
from typing import Any

import optuna
import yaml

from tuner.errors import InputError
from tuner.loadgen.slo import SLO
from tuner.study.objectives import Objectives, slo_constraints
from tuner.study.pareto import Point, completed_points, pick


def load_study(name: str, storage: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise InputError(f"no study named '{name}' in {storage} (studies: {', '.join(names) or 'none'})",
                         field="study") from None


def choose(study: optuna.Study, slo: SLO | None, prefer: str) -> Point:
    objectives = Objectives(latency=tuple(study.user_attrs["objectives"][1:]))
    points = completed_points(study)
    if slo is not None:
        points = [Point(**{**p.__dict__, "feasible": all(c <= 0 for c in slo_constraints(slo, p.summary))})
                  for p in points]
    best = pick(points, objectives, prefer)
    if best is None:
        raise InputError("no completed trial meets the SLO" if slo else "the study has no completed trial",
                         field="slo" if slo else "study")
    return best


def shell_line(point: Point) -> str:
    return shlex.join(point.command)


def argv_to_config(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split a serve command into its program words and a flag -> value mapping (`--config` files)."""
    program: list[str] = []
    config: dict[str, Any] = {}
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        program.append(argv[i])
        i += 1
    while i < len(argv):
        flag = argv[i].lstrip("-")
        has_value = i + 1 < len(argv) and not (argv[i + 1].startswith("--") or argv[i + 1] == "-")
        if has_value:
            value: Any = yaml.safe_load(argv[i + 1]) if argv[i + 1][:1] in "{[" else argv[i + 1]
            config[flag] = value
            i += 2
        elif flag.startswith("no-"):
            config[flag[3:]] = False
            i += 1
        else:
            config[flag] = True
            i += 1
    return program, config


def yaml_config(point: Point) -> str:
    program, config = argv_to_config(point.command)
    header = (f"# servetune: trial {point.number} ({point.engine}); use as: "
              f"{shlex.join(program)} --config THIS_FILE\n")
    return header + yaml.safe_dump(config, sort_keys=False)
