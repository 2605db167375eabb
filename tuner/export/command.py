"""The recommended serve command of a study, as a shell line or a config file."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import optuna
import yaml

from tuner.engines import engine_names, get_engine
from tuner.engines.base import Launch, OptionsFile
from tuner.errors import InputError
from tuner.loadgen.slo import SLO
from tuner.records.objectives import Objectives, slo_constraints
from tuner.records.pareto import Point, completed_points, pick
from tuner.records.trial import StudyRecord
from tuner.redact import redact_url
from tuner.space.fit import output_changes
from tuner.space.knobs import OUTPUT_CHANGING, SearchSpace, load_space


def load_study(name: str, storage: str) -> optuna.Study:
    from tuner.records.storage import open_store

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = open_store(storage, create=False)
    try:
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(opened)]
        raise InputError(f"no study named '{name}' in {redact_url(storage)} (studies: {', '.join(names) or 'none'})",
                         field="study") from None


def study_objectives(study: optuna.Study) -> Objectives:
    return Objectives(tuple(StudyRecord.of(study).objectives))


def points_under(study: optuna.Study, slo: SLO | None) -> list[Point]:
    """Completed trials; with `slo`, feasibility judged against it instead of the study's own SLO."""
    points = completed_points(study)
    if slo is not None:
        points = [Point(**{**p.__dict__, "feasible": all(c <= 0 for c in slo_constraints(slo, p.summary))})
                  for p in points]
    return points


def choose(study: optuna.Study, slo: SLO | None, prefer: str) -> Point:
    """The recommended configuration: the best that meets the SLO, else the best goodput (never none while
    a trial completed)."""
    best = pick(points_under(study, slo), study_objectives(study), prefer, StudyRecord.of(study).offered_rate)
    if best is None:
        raise InputError("the study has no completed trial", field="study")
    return best


def _options_flag(engine: str) -> str:
    return get_engine(engine).options_flag if engine in engine_names() else ""


def study_space(study: optuna.Study, point: Point) -> SearchSpace:
    """The space the trial's engine was tuned in: the study's own file where it still exists."""
    source = (study.user_attrs.get("spaces") or {}).get(point.engine)
    return load_space(source if source and Path(source).exists() else point.engine)


def output_note(study: optuna.Study, point: Point) -> str | None:
    """A comment line for exports whose configuration changes the model's outputs (None: it keeps them)."""
    try:
        changes = output_changes(study_space(study, point), point.config)
    except InputError:  # a space that no longer loads: nothing to say about it
        return None
    if not changes:
        return None
    return (f"# servetune: this configuration changes the model's outputs ({', '.join(changes)}); "
            f"tune with --exclude {OUTPUT_CHANGING} to keep them")


def options_file(study: optuna.Study, point: Point) -> OptionsFile | None:
    """The options file the trial's command names, rebuilt from its configuration and the study's space."""
    flag = _options_flag(point.engine)
    if not flag:
        return None
    space = study_space(study, point)
    options = get_engine(point.engine).options_file(Launch(config=point.config, model="", baseline=point.baseline),
                                                    space)
    if (options is not None) != (flag in point.command):
        raise InputError(f"trial {point.number}: its options file cannot be rebuilt from {space.source}, "
                         "which has changed since the trial ran", field="study")
    return options


def shell_line(point: Point, options: OptionsFile | None = None) -> str:
    """The serve command; with an options file, a heredoc that writes it first."""
    if options is None:
        return shlex.join(point.command)
    return f"cat > {shlex.quote(options.name)} <<'EOF'\n{options.text}EOF\n{shlex.join(point.command)}"


def _scalar(text: str) -> Any:
    """A flag's value as the YAML number it is, else the string (never YAML's `on` -> true)."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text
    return text


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
            value: Any = yaml.safe_load(argv[i + 1]) if argv[i + 1][:1] in "{[" else _scalar(argv[i + 1])
            config[flag] = value
            i += 2
        elif flag.startswith("no-"):
            config[flag[3:]] = False
            i += 1
        else:
            config[flag] = True
            i += 1
    return program, config


def yaml_config(point: Point, options: OptionsFile | None = None) -> str:
    """The flags as a `--config` file; for an engine that reads an options file, that file instead
    (the flags stay on the command line: such an engine's file takes other keys than its flags)."""
    flag = _options_flag(point.engine)
    if flag:
        argv = list(point.command)
        if options is None:
            argv += [flag, "THIS_FILE"]
        else:
            argv[argv.index(flag) + 1] = "THIS_FILE"
        return (f"# servetune: trial {point.number} ({point.engine}); use as: {shlex.join(argv)}\n"
                + (options.text if options else "{}\n"))
    program, config = argv_to_config(point.command)
    header = (f"# servetune: trial {point.number} ({point.engine}); use as: "
              f"{shlex.join(program)} --config THIS_FILE\n")
    return header + yaml.safe_dump(config, sort_keys=False)
