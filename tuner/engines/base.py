"""The one interface every engine adapter implements: argv, environment, readiness, failure classes."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tuner.engines.startup_phases import StartupPatterns, parse_startup
from tuner.errors import InputError
from tuner.outcome import Outcome
from tuner.space.flags import render_flags, render_options
from tuner.space.knobs import SearchSpace


@dataclass(frozen=True)
class Launch:
    """What a trial asks an engine to serve."""

    config: dict[str, Any]
    model: str  # a path or hub id; for the simulator, a model-shape name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    baseline: bool = False
    gpu: str = "h100"  # the simulator's GPU model; real engines use the GPU they are given
    time_scale: float = 1.0  # the simulator's clock speed-up
    python: str = sys.executable  # interpreter that has the engine installed
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    served_model_name: str = "servetune-model"
    max_model_len: int | None = None  # context length every request must fit
    dummy_weights: bool = False  # random weights for a config-only model folder (no download)


@dataclass(frozen=True)
class ServerSpec:
    """How the runner starts the server and knows it is ready."""

    argv: list[str]
    env: dict[str, str]
    url: str
    served_model_name: str
    api_key: str | None = None
    health_path: str = "/health"
    clock_scale: float = 1.0
    metrics_prefix: str = ""
    vocab_size: int = 32000


def cache_root() -> Path:
    """The machine's cache for the tuner and the engines it starts; shared by every study."""
    return Path(os.environ.get("SERVETUNE_CACHE") or Path.home() / ".cache" / "servetune")


@dataclass(frozen=True)
class OptionsFile:
    """The settings of a trial's `option:` knobs, as the YAML file an engine flag names."""

    flag: str  # the flag that takes the file's path
    name: str  # the file name an exported command uses
    text: str  # the YAML

    def write(self) -> Path:
        """Into the cache, named by content, for the runner's own launch."""
        path = cache_root() / "options" / f"{hashlib.sha256(self.text.encode()).hexdigest()[:16]}-{self.name}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(self.text)
            tmp.replace(path)
        return path


def key_file(key: str, flag: str = "api-key") -> Path:
    """A YAML file `{flag}: KEY` only this user can read, for engines that take a secret from a config file
    rather than the environment (argv is world-readable in `ps`). Named by the key's hash; see remove_key_file."""
    folder = Path(tempfile.gettempdir()) / f"servetune-keys-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise OSError(f"{folder} is not a private directory of this user")
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.yaml"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(yaml.safe_dump({flag: key}))
    return path


def key_file_args(launch: Launch) -> list[str]:
    """`--config FILE` with the launch's API key in a key_file; none without a key."""
    return ["--config", str(key_file(launch.api_key))] if launch.api_key else []


def remove_key_file(key: str | None) -> None:
    if key:
        folder = Path(tempfile.gettempdir()) / f"servetune-keys-{os.getuid()}"
        (folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.yaml").unlink(missing_ok=True)


@dataclass(frozen=True)
class FailurePattern:
    failure: Outcome
    pattern: re.Pattern


@dataclass
class Engine(ABC):
    """An engine adapter. Subclasses know one engine and nothing about any other, and register
    themselves with `@register_engine(name)` (tuner.engines.registry); the CLI's engine choices, sweep
    validation and exports read the registry and the class facts below, nowhere else.

    Lifecycle, and which process calls each hook:

    - Required (abstract): `program`, `display_program`, `model_args`.
    - The lead process (`tune`), before any trial: `version` and `help_argv` (the flags of the installed
      version are probed once and knobs it lacks dropped), `clock_scale` (deadlines of each trial).
    - The trial worker (a Ray actor, `tuner.runner.trial.execute_trial`), once per trial:
      `server_spec` (built from `program`, `model_args`, `connection_args`, `environment` and
      `options_file`) to start the server, `serve_command` for the record, `engine_metrics` (with
      `derived_metrics`) from /metrics after the replay, `classify_failure` on the log when it fails.
    - Exports (`tune export`, any process): `display_program`, `options_file`, `model_flag`, and for
      container formats `image`, `port` and `container`.
    Optional hooks have working defaults; override only what the engine does differently.
    """

    # facts about the engine, read from the class (no instance needed)
    simulated: ClassVar[bool] = False  # a performance model, not a measurement: labelled SIMULATED
    needs_gpu: ClassVar[bool] = True  # trials need a GPU of this machine (sweeps skip cells without one)
    default_gpu: ClassVar[str] = ""  # the GPU model a simulator plays when none is named
    auto: ClassVar[bool] = False  # `--engine auto` picks it where a GPU and `display_program()[0]` exist
    image: ClassVar[str] = ""  # the official container image (empty: no container export)
    port: ClassVar[int] = 8000  # the port it listens on by default, and in its container
    model_flag: ClassVar[str] = ""  # the flag before the model in `serve_command` (empty: positional)
    space_file: ClassVar[str] = ""  # its search space when not tuner/search_spaces/<name>.yaml
    # modules a fork server (tuner/runner/forkserver.py) imports once, so servers started as
    # `python -m module ...` are forked from it and skip that import; empty: every server starts cold
    preload_modules: ClassVar[tuple[str, ...]] = ()

    name: str = ""
    package: str = ""  # the Python package the engine ships as, asked for its version
    metrics_prefix: str = ""
    failure_patterns: list[FailurePattern] = field(default_factory=list)
    options_flag: str = ""  # the flag that takes a YAML file of the `option:` knobs; empty: none
    options_name: str = "options.yaml"

    @abstractmethod
    def program(self, launch: Launch) -> list[str]:
        """How the runner starts the engine (with the interpreter that has it installed)."""

    @abstractmethod
    def display_program(self) -> list[str]:
        """How a person starts the engine, for exported commands."""

    @abstractmethod
    def model_args(self, launch: Launch) -> list[str]:
        """The flags that name the model, its context length and (dummy) weights."""

    def container(self, model: str) -> tuple[list[str], list[str]]:
        """(command, arguments before the trial's flags) in `image`, listening on all interfaces on
        `port`; an empty command runs the image's own entrypoint."""
        raise NotImplementedError(f"engine {self.name} has no container image")

    def connection_args(self, launch: Launch) -> list[str]:
        return ["--host", launch.host, "--port", str(launch.port), "--served-model-name", launch.served_model_name]

    def environment(self, launch: Launch) -> dict[str, str]:
        return dict(launch.extra_env)

    def version(self, python: str = sys.executable) -> str:
        """The installed engine's version, asked of the interpreter that will run it: from the package's
        metadata where it has some (importing vLLM to read `__version__` took 20 s on the H200, 9 s here),
        without a local label (`0.32.0+cpu` -> `0.32.0`, as `vllm.__version__` says); else by importing it."""
        if not self.package:
            return "unknown"
        package = self.package
        code = ("import importlib.metadata as m, importlib.util as u\n"
                f"if u.find_spec({package!r}) is None: print('unknown')\n"
                "else:\n"
                f"    try: print(m.version({package!r}).split('+')[0])\n"
                f"    except m.PackageNotFoundError: import {package}; print({package}.__version__)")
        try:
            out = subprocess.run([python or "python3", "-c", code], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        lines = out.stdout.strip().splitlines()  # the last: some packages print a banner on import
        return lines[-1].strip() if lines else "unknown"

    def help_argv(self, python: str) -> list[str] | None:
        """The command that lists every flag of the installed version (None: nothing to probe)."""
        return None

    def options_file(self, launch: Launch, space: SearchSpace) -> OptionsFile | None:
        """The `option:` knobs of this launch as a file, or None when it has none to set."""
        options = render_options(space, launch.config, baseline=launch.baseline)
        if not options:
            return None
        if not self.options_flag:
            raise InputError(f"engine {self.name} reads no options file, so no knob of its space can have "
                             "`option:`", file=space.source)
        return OptionsFile(flag=self.options_flag, name=self.options_name,
                           text=yaml.safe_dump(options, sort_keys=False))

    def fast_start_args(self, launch: Launch, flags: list[str]) -> list[str]:
        """Flags that shorten the start-up of a trial whose knob flags are `flags`, without changing how
        it serves; in the exported command too, so a hand-started server is the one measured. A
        defaults baseline gets none (it carries no tuned flag)."""
        return []

    def startup_patterns(self) -> StartupPatterns | None:
        """The log lines that report start-up phases (None: the engine's start-up is not broken down)."""
        return None

    def startup_phases(self, log_text: str, launched_at: float, ready_s: float) -> dict[str, float]:
        """Seconds per start-up phase of a server launched at `launched_at` (epoch) and ready `ready_s` later."""
        found = self.startup_patterns()
        return parse_startup(log_text, found, launched_at, ready_s).to_dict() if found else {}

    def clock_scale(self, launch: Launch) -> float:
        """How much faster than the wall clock the server's clock runs (only a simulator's does)."""
        return 1.0

    def server_spec(self, launch: Launch, space: SearchSpace, vocab_size: int = 32000) -> ServerSpec:
        options = self.options_file(launch, space)
        flags = render_flags(space, launch.config, baseline=launch.baseline)
        argv = [*self.program(launch), *self.model_args(launch), *self.connection_args(launch),
                *flags, *self.fast_start_args(launch, flags),
                *([options.flag, str(options.write())] if options else []), *launch.extra_args]
        return ServerSpec(argv=argv, env=self.environment(launch), url=f"http://{launch.host}:{launch.port}",
                          served_model_name=launch.served_model_name, api_key=launch.api_key,
                          clock_scale=self.clock_scale(launch),
                          metrics_prefix=self.metrics_prefix, vocab_size=vocab_size)

    def serve_command(self, launch: Launch, space: SearchSpace) -> list[str]:
        """The command a person pastes: no tuner-internal port or key, the engine's own defaults."""
        options = self.options_file(launch, space)
        flags = render_flags(space, launch.config, baseline=launch.baseline)
        return [*self.display_program(), *self.model_args(launch), *flags, *self.fast_start_args(launch, flags),
                *([options.flag, options.name] if options else []), *launch.extra_args]

    def classify_failure(self, exit_code: int | None, log_tail: str) -> Outcome:
        for item in self.failure_patterns:
            if item.pattern.search(log_tail):
                return item.failure
        return Outcome.CRASH

    def engine_metrics(self, prometheus_text: str) -> dict[str, float]:
        """The engine's own counters and gauges worth logging, prefix stripped (see aggregate_metrics)."""
        values = aggregate_metrics(prometheus_text, self.metrics_prefix)
        values.update(self.derived_metrics(values))
        return values

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """Ratios every engine reports under the same names (`spec_decode_acceptance_rate`,
        `spec_decode_mean_accepted_length`, `prefix_cache_hit_rate`), from its own counters."""
        return {}


def aggregate_metrics(prometheus_text: str, prefix: str) -> dict[str, float]:
    """One value per sample name under `prefix` (stripped), across label sets (one per engine or data-parallel
    rank): counters, histogram sums/counts and untyped samples are summed; a gauge (KV usage, requests running)
    is averaged, with `<name>_max` beside it when there are several label sets. Timestamps are not values."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, list[float]] = {}
    gauges: set[str] = set()
    try:
        for family in text_string_to_metric_families(prometheus_text):
            if not family.name.startswith(prefix):
                continue
            for sample in family.samples:
                name = sample.name[len(prefix):]
                if name.endswith(("_bucket", "_created")) or math.isnan(sample.value):
                    continue
                sums.setdefault(name, []).append(float(sample.value))
                if family.type == "gauge":
                    gauges.add(name)
    except ValueError:  # a malformed line ends the parse; what came before it is kept
        pass
    values: dict[str, float] = {}
    for name, samples in sums.items():
        if name in gauges:
            values[name] = sum(samples) / len(samples)
            if len(samples) > 1:
                values[f"{name}_max"] = max(samples)
        else:
            values[name] = sum(samples)
    return values


def patterns(*pairs: tuple[Outcome, str]) -> list[FailurePattern]:
    return [FailurePattern(failure, re.compile(regex, re.IGNORECASE | re.MULTILINE)) for failure, regex in pairs]
