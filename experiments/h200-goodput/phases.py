"""Helpers of run.sh (stdlib + the tuner only), one per subcommand:

  one LOG LAUNCHED_AT READY_S   start-up phases of one vLLM server log, as JSON
  runnable EXPORTED             the exported shell line as the argv that runs here, one word a line
  defaults ENGINE MAXLEN SIMSCALE  the defaults trial's command (same model and context, no tuned flag), one word a line
  table WORKDIR                 markdown: phases of every server (study trials and hand-started; forked or cold),
                                hold-out goodput
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import statistics
import sys
from pathlib import Path

from tuner.engines import get_engine
from tuner.engines.base import Launch
from tuner.models.stub import stub_model_dir
from tuner.runner.forkserver import MARKER
from tuner.space.knobs import load_space

PHASES = ["import", "model_load", "torch_compile", "kv_profile", "kv_cache", "prefill_graphs", "cuda_graphs", "api_up",
          "other", "ready"]  # kv_cache, prefill_graphs: SGLang's


def exported_argv(path: str) -> list[str]:
    lines = [line for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise SystemExit(f"{path}: no exported command")
    return runnable(shlex.split(lines[-1]))


def runnable(argv: list[str]) -> list[str]:
    """A person's command (`vllm serve`, `tune sim-serve`) as this machine's interpreter runs it."""
    if argv[:2] == ["vllm", "serve"]:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *argv[2:]]
    if argv[:2] == ["tune", "sim-serve"]:
        return [sys.executable, "-m", "tuner", "sim-serve", *argv[2:]]
    raise SystemExit(f"not a vllm or sim-serve command: {shlex.join(argv)[:80]}")


def defaults_argv(engine: str, max_model_len: str, sim_scale: str) -> list[str]:
    """The command of the study's defaults trial: the same model and context, no tuned flag."""
    space = load_space(engine)
    if engine == "sim":
        launch = Launch(config=space.defaults(), model="llama-3.1-8b", gpu="h200", time_scale=float(sim_scale),
                        max_model_len=int(max_model_len), baseline=True)
    else:
        launch = Launch(config=space.defaults(), model=str(stub_model_dir("llama-3.1-8b")),
                        max_model_len=int(max_model_len), dummy_weights=True, baseline=True)
    return runnable(get_engine(engine).serve_command(launch, space))


def one(log: str, launched_at: str, ready_s: str) -> dict[str, float]:
    text = Path(log).read_text(errors="replace")
    return get_engine("vllm").startup_phases(text, float(launched_at), float(ready_s))


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _start(log: Path) -> str:
    """How the server started: forked from the tuner's fork server, or as a new process."""
    try:
        with open(log, errors="replace") as handle:
            return "forked" if handle.readline().startswith(MARKER) else "cold"
    except OSError:
        return "?"


def table(work: Path) -> str:
    rows = []
    for path in sorted(work.glob("runs/**/startup_phases.json")):
        rows.append((path.parent.name, _start(path.with_name("server.log")), json.loads(path.read_text())))
    for path in sorted(work.glob("*.phases.json")):
        name = path.name.split(".")[0]
        rows.append((f"by hand: {name}", _start(work / f"{name}.server.log"), json.loads(path.read_text())))
    out = ["| server | start | " + " | ".join(PHASES) + " |", "|---" * (len(PHASES) + 2) + "|"]
    for name, start, phases in rows:
        out.append(f"| {name} | {start} | " + " | ".join(_cell(phases.get(p)) for p in PHASES) + " |")
    for start in ("forked", "cold"):
        ready = [phases["ready"] for _, how, phases in rows if "ready" in phases and how == start]
        if ready:
            out.append(f"\nready, {start}: median {statistics.median(ready):.1f} s over {len(ready)} servers "
                       f"(min {min(ready):.1f}, max {max(ready):.1f})")
    out.append("\n| hold-out | repeats | goodput req/s (each) | mean | output tok/s mean | TTFT p99 ms | TPOT p99 ms |")
    out.append("|---|---|---|---|---|---|---|")
    for which in ("tuned", "defaults", "fp8", "tuned-train", "defaults-train"):
        runs = [json.loads(p.read_text()) for p in sorted(work.glob(f"bench/{which}-[0-9]*/summary.json"))]
        if not runs:
            continue
        good = [r.get("goodput") or 0.0 for r in runs]
        out.append(f"| {which} | {len(runs)} | {', '.join(f'{g:.2f}' for g in good)} | {statistics.mean(good):.2f} | "
                   f"{statistics.mean(r.get('output_throughput') or 0.0 for r in runs):.0f} | "
                   f"{', '.join(_cell(r.get('p99_ttft_ms')) for r in runs)} | "
                   f"{', '.join(_cell(r.get('p99_tpot_ms')) for r in runs)} |")
    store = work / "runs" / "mlflow.db"
    if store.exists():  # proof 5: the tuner's own MLflow store, written on this machine
        with sqlite3.connect(store) as db:
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
            names = [row[0] for row in db.execute("SELECT name FROM experiments")]
        out.append(f"\nMLflow ({store.name}): {runs} runs in experiments {', '.join(names)}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "one":
        print(json.dumps(one(*args)))
    elif command == "runnable":
        print("\n".join(exported_argv(args[0])))
    elif command == "defaults":
        print("\n".join(defaults_argv(*args)))
    elif command == "table":
        print(table(Path(args[0])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
