"""Run a sweep: each cell of the matrix is one study through the tuner itself, then its figures are kept."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import optuna

from tuner.engines import get_engine
from tuner.errors import InputError
from tuner.records.objectives import THROUGHPUT
from tuner.records.pareto import completed_points
from tuner.report.results import STOPPED, StudyResult, load_result
from tuner.sweep.compare import coefficient_of_variation, learned_threshold
from tuner.sweep.results import CellResult, RunResults
from tuner.sweep.spec import Cell, SweepSpec


def run_id_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def local_gpus() -> list[str]:
    """GPU kinds of this machine, one per GPU ('?' for a GPU without a preset)."""
    from tuner.hardware.inventory import detect

    return [gpu.preset or "?" for gpu in detect()]


def skip_reason(cell: Cell, gpus_here: list[str]) -> str | None:
    """Real engines run on the GPUs of this machine: a cell for other hardware waits for its own runner."""
    if not get_engine(cell.engine).needs_gpu:
        return None
    if not gpus_here:
        return "skipped: no GPU on this machine"
    if cell.gpu and cell.gpu not in gpus_here:
        return f"skipped: needs {cell.gpu}, this machine has {', '.join(sorted(set(gpus_here)))}"
    if cell.gpus > len(gpus_here):
        return f"skipped: needs {cell.gpus} GPUs, this machine has {len(gpus_here)}"
    return None


def tune_options(spec: SweepSpec, cell: Cell, study_name: str, work_dir: Path):
    """The same options `tune --workload ...` would build for this cell."""
    from tuner.models.shapes import get_shape
    from tuner.study.tune import TuneOptions
    from tuner.workload.transform import load_workload, trace_digest

    w = cell.workload
    requests = load_workload(w.path, w.format, w.rows, w.seconds, w.time_scale)
    if not requests:
        raise InputError("no requests left after slicing", file=str(w.path))
    shape = get_shape(cell.model) if cell.shaped else None
    engine_args = list(spec.engine_args)
    model = cell.model
    simulated = get_engine(cell.engine).simulated
    if not simulated and shape is not None:
        from tuner.models.stub import stub_model_dir

        model = str(stub_model_dir(shape.name))
    longest = max(r.input_tokens + r.output_tokens for r in requests)
    max_model_len = -(-longest // 1024) * 1024
    if shape is not None and max_model_len > shape.max_position:
        raise InputError(f"the workload needs {longest} tokens of context; {shape.name} has {shape.max_position}",
                         file=str(spec.path), field="matrix.workloads")
    mlflow_uri = spec.mlflow_uri if spec.mlflow_uri != "" else f"sqlite:///{(work_dir / 'mlflow.db').resolve()}"
    return TuneOptions(
        workload=w.path, requests=requests, workload_digest=trace_digest(w.path), engines=[cell.engine], model=model,
        shape=shape, gpus=cell.gpus, gpu=cell.gpu, trials=spec.trials, objectives=spec.objectives, slo=spec.slo,
        sampler=spec.sampler, seed=spec.seed, study_name=study_name,
        storage=f"sqlite:///{(work_dir / 'optuna.db').resolve()}", out_dir=work_dir, mlflow_uri=mlflow_uri,
        sim_time_scale=spec.sim_time_scale, engine_python=spec.engine_python, engine_args=engine_args,
        vocab_size=shape.vocab_size if shape else 32000, max_model_len=max_model_len,
        dummy_weights=not simulated and shape is not None)


def measure_defaults_again(options, repeats: int) -> list[dict[str, float | None]]:
    """Run the engine's defaults `repeats` more times, in a study of their own, through the tuner."""
    from tuner.study.sampling import baseline_params
    from tuner.study.tune import Tuner

    options = replace(options, study_name=f"{options.study_name}-repeats", trials=repeats, mlflow_uri=None)
    tuner = Tuner(options)
    study = optuna.create_study(study_name=options.study_name, storage=options.storage,
                                directions=tuner.objectives.directions, load_if_exists=True)
    if not study.trials:
        for _ in range(repeats):
            study.enqueue_trial(baseline_params(tuner.spaces, options.engines[0]), user_attrs={"baseline": True},
                                skip_if_exists=False)
    tuner.run()
    return [{THROUGHPUT: p.value(THROUGHPUT), "goodput": p.summary.get("goodput")}
            for p in completed_points(study) if p.baseline]


def cell_result(cell: Cell, result: StudyResult, report: Path, repeats: list) -> CellResult:
    out = CellResult(id=cell.id, study=result.name, model=cell.model, workload=cell.workload.name,
                     engine=cell.engine, gpu=cell.gpu, gpus=cell.gpus, simulated=get_engine(cell.engine).simulated,
                     status="ok" if result.points else "no trial completed", trials_completed=len(result.points),
                     trials_failed=sum(not i.cause.startswith(STOPPED) for i in result.issues),
                     trials_stopped=sum(i.cause.startswith(STOPPED) for i in result.issues),
                     trials_rejected=sum(result.rejected.values()),
                     first_latency=result.first_latency,
                     report=str(report))
    if result.points:
        out.front = [list(pair) for pair in result.front_pairs()]
        out.reference = list(result.reference())
        out.hypervolume = result.hypervolume()
    if result.best is not None:
        out.best_trial = result.best.number
        out.best_throughput = result.best.value(THROUGHPUT)
        out.best_latency_ms = result.best.value(result.first_latency)
    if (best_goodput := result.best_goodput()) is not None:
        out.best_goodput = best_goodput[1]
    if result.baseline is not None:
        out.baseline_throughput = result.baseline.value(THROUGHPUT)
        out.baseline_latency_ms = result.baseline.value(result.first_latency)
        out.baseline_goodput = result.goodput.get(result.baseline.number)
    if repeats:
        samples = repeats + ([{THROUGHPUT: out.baseline_throughput, "goodput": out.baseline_goodput}]
                             if result.baseline is not None else [])
        out.repeats = repeats
        cvs = [coefficient_of_variation([s[m] for s in samples]) for m in (THROUGHPUT, "goodput")]
        out.noise_cv = max((cv for cv in cvs if cv is not None), default=None)
    return out


def _unmeasured(cell: Cell, status: str) -> CellResult:
    return CellResult(id=cell.id, study="", model=cell.model, workload=cell.workload.name, engine=cell.engine,
                      gpu=cell.gpu, gpus=cell.gpus, simulated=get_engine(cell.engine).simulated, status=status)


def run_sweep(spec: SweepSpec, work_dir: Path, repeats: int,
              say: Callable[[str], None] = print) -> tuple[RunResults, list[StudyResult]]:
    """Every cell, one after the other. Returns the run's results and the cells' study results."""
    from tuner.runner import ray_local_only

    ray_local_only()  # before Ray is imported
    from tuner.runner.pool import init_ray
    from tuner.study.tune import Tuner

    run_id = run_id_now()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    work_dir.mkdir(parents=True, exist_ok=True)
    gpus_here = local_gpus() if any(get_engine(c.engine).needs_gpu for c in spec.cells) else []
    runnable = [c for c in spec.cells if skip_reason(c, gpus_here) is None]
    if runnable:
        init_ray(None, max(c.gpus for c in runnable))
    cells, studies = [], []
    began = time.monotonic()
    for index, cell in enumerate(spec.cells, 1):
        reason = skip_reason(cell, gpus_here)
        if reason:
            say(f"[cell {index}/{len(spec.cells)}] {cell.id}: {reason}")
            cells.append(_unmeasured(cell, reason))
            continue
        name = f"{spec.name}-{cell.id}-{run_id}"
        say(f"\n[cell {index}/{len(spec.cells)}] {cell.id}: study {name} "
            f"({time.monotonic() - began:.0f}s into the sweep)")
        try:
            options = tune_options(spec, cell, name, work_dir)
            tuner = Tuner(options)
            study = tuner.run()
            tuner.report(study)
            measured = measure_defaults_again(options, repeats) if repeats else []
        except InputError as exc:  # e.g. the engine is not installed on this runner: the other cells go on
            say(f"[cell {index}/{len(spec.cells)}] {cell.id}: error: {exc}")
            cells.append(_unmeasured(cell, f"error: {exc}"))
            continue
        result = load_result(study, run_dir=work_dir / name)
        cells.append(cell_result(cell, result, work_dir / name / "report.md", measured))
        studies.append(result)
    run = RunResults(spec=spec.name, spec_path=str(spec.path), run_id=run_id, started_at=started,
                     finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     storage=f"sqlite:///{(work_dir / 'optuna.db').resolve()}",
                     slo=str(spec.slo) if spec.slo else "", cells=cells,
                     learned_threshold=learned_threshold(cells))
    return run, studies
