"""`tune --workload FILE --gpus N --model M`: the main job."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

from tuner.engines import engine_names, get_engine, is_simulated, needs_gpu
from tuner.errors import InputError
from tuner.models.shapes import PRESETS, get_shape
from tuner.records.objectives import Objectives
from tuner.records.storage import open_store
from tuner.redact import redact_url
from tuner.runner import ray_local_only
from tuner.study.lock import StudyLock

DEFAULT_OUT = Path("servetune-runs")
MAX_SPAN_S = 30 * 86400  # a trial replays the trace in real time: a month is already far too long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", required=True, help="trace file (Mooncake JSONL, Azure CSV, native JSONL)")
    w.add_argument("--format", default=None, help="trace format (default: detected)")
    w.add_argument("--rows", type=int, default=None, help="replay only the first N requests")
    w.add_argument("--seconds", type=float, default=None, help="replay only the first T seconds of the trace")
    w.add_argument("--time-scale", type=float, default=1.0, help="replay the trace k× faster (more load)")
    w.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    w.add_argument("--concurrency", type=int, default=None, help="closed loop at this concurrency")
    w.add_argument("--max-concurrency", type=int, default=None, help="cap requests in flight (open loop)")
    m = parser.add_argument_group("model and hardware")
    m.add_argument("--model", default=None, help="model path or hub id; for --engine sim, a model shape")
    m.add_argument("--model-shape", default=None, choices=sorted(PRESETS),
                   help="tune a model shape with dummy weights (no download)")
    m.add_argument("--engine", default="auto", help=f"{', '.join(engine_names())}, a comma-separated list, "
                   "or auto (the simulator without a GPU)")
    m.add_argument("--gpus", type=int, default=1, help="GPUs to use; logical GPUs for the simulator")
    m.add_argument("--gpu", default=None, help="GPU model for the simulator and constraints (h100, h200, a100...)")
    m.add_argument("--engine-python", action="append", default=[], metavar="[ENGINE=]PY",
                   help="python that has the engine installed (default: this one); ENGINE=PY for one engine "
                        "of the study, e.g. --engine-python vllm=.venv-vllm/bin/python (repeat)")
    m.add_argument("--engine-arg", action="append", default=[], metavar="[ENGINE:]ARGS",
                   help="extra flags for every server, e.g. --engine-arg='--enforce-eager'; ENGINE:ARGS for one "
                        "engine's servers, e.g. --engine-arg='sglang:--attention-backend triton' (repeat)")
    m.add_argument("--engine-env", action="append", default=[], metavar="[ENGINE:]KEY=VALUE",
                   help="KEY=VALUE for every server; ENGINE:KEY=VALUE for one engine's servers (repeat)")
    m.add_argument("--max-model-len", type=int, default=None,
                   help="context length given to every server (default: the workload's longest request)")
    m.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to be ready")
    m.add_argument("--cold-start", action="store_true",
                   help="start every server as a new process (default: fork engines that support it from one "
                        "process that imported the engine once, on tune's machine)")
    m.add_argument("--sim-time-scale", type=float, default=10.0, help="simulator clock speed-up")
    m.add_argument("--host", default="127.0.0.1",
                   help="address trial servers bind (default 127.0.0.1: not reachable from other machines)")
    s = parser.add_argument_group("search")
    s.add_argument("--trials", type=int, default=None, help="trials in all, the defaults baseline included")
    s.add_argument("--budget", default=None, help="wall-clock budget, e.g. 90m or 2h")
    s.add_argument("--slo", default=None, help="e.g. ttft_p99=800ms,tpot_p99=60ms")
    s.add_argument("--objective", default=None,
                   help="objectives, comma-separated, each maximised or minimised as its metric says: goodput, "
                        "goodput_per_gpu, output_throughput[_per_gpu], request_throughput, ttft|tpot|itl|e2e_"
                        "mean|p50|p90|p99|max (default: goodput with --slo, per GPU when --gpus > 1; else "
                        "output_throughput,ttft_p99,tpot_p99)")
    s.add_argument("--latency", default=None,
                   help="round-1 form: output throughput up and these latencies down (e.g. ttft_p99,tpot_p99)")
    s.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random", "grid"],
                   help="grid: every combination of discrete knobs, in random order")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--space", default=None, help="your own search-space YAML")
    s.add_argument("--fix", action="append", default=[],
                   help="KNOB=VALUE held fixed (repeat); ENGINE:KNOB=VALUE for one engine of several")
    s.add_argument("--exclude", action="append", default=[],
                   help="knob or group held at default (repeat); output-changing: only settings that keep the "
                        "model's outputs (no weight quantization, no fp8 KV cache, no lossy speculation)")
    e = parser.add_argument_group("early stopping and multi-fidelity")
    e.add_argument("--no-prune", action="store_true",
                   help="with --slo: run every trial to its end, even once its SLO is certainly lost")
    e.add_argument("--halving", action="store_true",
                   help="successive halving over trace length (rungs at 1/4, 1/2, all of the trace): stop trials "
                        "outside the top 1/eta by goodput (throughput without --slo), and those that cannot beat "
                        "the best goodput")
    e.add_argument("--prescreen", choices=["off", "sim"], default="off",
                   help="sim: the simulator, calibrated on this study's real trials, screens proposals; only "
                        "the most promising launch (see --prescreen-keep)")
    e.add_argument("--prescreen-keep", type=float, default=0.25, metavar="SHARE",
                   help="with --prescreen sim: a proposal launches when its predicted goodput per GPU (throughput "
                        "without --slo) is in this best share of all predictions so far (default: %(default)s)")
    e.add_argument("--eta", type=float, default=2.0, help="successive halving keeps the top 1/eta at each rung")
    e.add_argument("--finalists", type=int, default=None,
                   help="after the search, measure the N best configurations and the defaults again on fresh "
                        "servers (--repeats times each) and say whether the best beats the defaults beyond noise "
                        "(default: 2 for real engines with --slo, else 0)")
    e.add_argument("--repeats", type=int, default=3, help="re-measurements per finalist, each with new arrival times")
    e.add_argument("--capacity", action="store_true",
                   help="with --slo: find the highest request rate each finalist sustains within the SLO (bisection)")
    e.add_argument("--attainment", type=float, default=0.99,
                   help="--capacity: fraction of requests that must meet the SLO for a rate to hold")
    r = parser.add_argument_group("results")
    r.add_argument("--study-name", default=None, help="same name resumes (default: from engine, model, trace)")
    r.add_argument("--out", default=str(DEFAULT_OUT), help="directory for logs, plots and the default stores")
    r.add_argument("--storage", default=None,
                   help="Optuna storage: an RDB URL (sqlite:///F, postgresql://U:P@HOST/DB) or journal:///SHARED/FILE "
                        "(default: SQLite file under --out)")
    r.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: SQLite file under --out)")
    r.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    r.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (auto or HOST:PORT) instead of starting one; trials run on its nodes")
    r.add_argument("--quiet", action="store_true")


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*", text)
    if not match:
        raise InputError(f"expected a duration like 90m or 2h, got '{text}'", field="budget")
    seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 60}[match.group(2)]
    if not seconds > 0:
        raise InputError(f"must be positive, got '{text}'", field="budget")
    return seconds


def check_numbers(args: argparse.Namespace) -> None:
    """Values a server or the replay would refuse in every trial, refused before anything starts."""
    for name in ("max_model_len", "concurrency", "max_concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"must be at least 1, got {value}", field=name.replace("_", "-"))
    for name in ("sim_time_scale", "startup_timeout"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            raise InputError(f"must be a positive number, got {value}", field=name.replace("_", "-"))
    if not (args.eta > 1 and math.isfinite(args.eta)):
        raise InputError(f"must be above 1, got {args.eta}", field="eta")
    if args.finalists is not None and args.finalists < 0:
        raise InputError(f"must be at least 0, got {args.finalists}", field="finalists")
    if args.repeats < 2:
        raise InputError(f"a confidence interval needs at least 2 repeats, got {args.repeats}", field="repeats")
    for name in ("attainment", "prescreen_keep"):
        if not 0 < getattr(args, name) <= 1:
            raise InputError(f"must be within (0, 1], got {getattr(args, name)}", field=name.replace("_", "-"))
    if args.capacity and not args.slo:
        raise InputError("the capacity search needs an SLO: give --slo", field="capacity")


def check_host(host: str) -> str:
    """An IPv4 address or a name that resolves to one (the runner probes ports over IPv4)."""
    try:
        socket.getaddrinfo(host, None, socket.AF_INET)
    except (socket.gaierror, UnicodeError, ValueError):
        raise InputError(f"{host!r} is not an IPv4 address or a resolvable host name", field="host") from None
    return host


def check_host_is_local(host: str) -> None:
    """Trial servers on this machine must be able to bind `host` (with --ray-address they run elsewhere)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError as exc:
        raise InputError(f"{host!r} is not an address of this machine ({exc.strerror}); trial servers could "
                         "not listen on it", field="host") from None


def check_study_name(name: str) -> str:
    """The name becomes a folder under --out: no path separators, no `..`, nothing unprintable."""
    if (not name or len(name) > 200 or name in (".", "..") or any(c in name for c in "/\\")
            or not name.isprintable()):
        raise InputError(f"{name!r} cannot name a study: use at most 200 printable characters, without "
                         "'/', '\\' and not '.' or '..'", field="study-name")
    return name


RAY_ADDRESS = re.compile(r"(auto|local|(ray://)?[A-Za-z0-9_.\-]+:(\d{1,5}))")


def check_ray_address(address: str | None) -> str | None:
    match = RAY_ADDRESS.fullmatch(address) if address is not None else None
    if address is not None and (match is None or (match.group(3) and not 0 < int(match.group(3)) < 65536)):
        raise InputError(f"expected auto or HOST:PORT of the head node (e.g. 10.0.0.5:6379), got {address!r}",
                         field="ray-address")
    return address


def check_requests(requests: list, workload: Path, max_model_len: int | None) -> int:
    """What no server could serve; the longest request (prompt + output) in tokens."""
    longest = max(r.input_tokens + r.output_tokens for r in requests)
    if max_model_len is not None and max_model_len < longest:
        raise InputError(f"{max_model_len} tokens of context, but the workload's longest request needs {longest} "
                         "(prompt + output): give at least that, or slice the workload", field="max-model-len")
    if not any(r.output_tokens for r in requests):
        raise InputError("every request asks for 0 output tokens: there is no generation to measure",
                         file=str(workload))
    span = requests[-1].arrival_s - requests[0].arrival_s
    if span > MAX_SPAN_S:
        raise InputError(f"the selection spans {span:.3g} s, which each trial would replay in real time; slice it "
                         "(--seconds, --rows) or replay it faster (--time-scale)", file=str(workload))
    return longest


def _has_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def resolve_engines(text: str) -> list[str]:
    names = engine_names()
    if text == "auto":
        adapters = [get_engine(n) for n in names]
        real = [a.name for a in adapters if a.auto and shutil.which(a.display_program()[0])] if _has_gpu() else []
        return real[:1] or [next(a.name for a in adapters if a.simulated)]
    engines = [e.strip() for e in text.split(",") if e.strip()]
    if not engines:
        raise InputError(f"name an engine ({', '.join(names)}), a comma-separated list, or auto", field="engine")
    for engine in engines:
        if engine not in names:
            raise InputError(f"unknown engine '{engine}' ({', '.join(names)}, auto)", field="engine")
    if len(engines) > 1 and any(get_engine(e).simulated for e in engines):
        raise InputError("the simulator is tuned on its own, not beside real engines", field="engine")
    return engines


def per_engine(items: list[str], sep: str, engines: list[str], option: str) -> dict[str, list[str]]:
    """Split `[ENGINE<sep>]VALUE` items by engine ("" for every engine) when the prefix names an engine.
    An engine this study does not tune is an error, not a silent no-op."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, found, rest = item.partition(sep)
        engine = name.strip() if found and name.strip() in engine_names() else ""
        if engine and engine not in engines:
            raise InputError(f"'{item}' is for {engine}, which this study does not tune ({', '.join(engines)})",
                             field=option)
        out.setdefault(engine, []).append(rest.strip() if engine else item)
    return out


def run(args: argparse.Namespace) -> int:
    from tuner.loadgen.slo import parse_slo
    from tuner.study.tune import TuneOptions, Tuner
    from tuner.workload.transform import load_workload, trace_digest

    engines = resolve_engines(args.engine)
    host = check_host(args.host)
    if args.ray_address is None:
        check_host_is_local(host)
    check_ray_address(args.ray_address)
    if args.study_name is not None:
        check_study_name(args.study_name)
    if args.gpus < 1:
        raise InputError("must be at least 1", field="gpus")
    check_numbers(args)
    if args.objective and args.latency:
        raise InputError("give --objective or --latency, not both", field="objective")
    objectives = (Objectives.parse(args.objective) if args.objective
                  else Objectives.legacy(args.latency) if args.latency else None)
    slo = parse_slo(args.slo) if args.slo else None
    if objectives is not None and objectives.needs_slo and slo is None:
        raise InputError(f"objective {objectives.primary} needs an SLO: give --slo", field="objective")
    finalists = args.finalists if args.finalists is not None else (
        2 if slo is not None and not is_simulated(engines) else 0)
    budget = parse_duration(args.budget) if args.budget else None
    trials = args.trials if args.trials is not None else (None if budget else 12)
    if trials is not None and trials < 1:
        raise InputError("must be at least 1", field="trials")
    workload = Path(args.workload)
    requests = load_workload(workload, args.format, args.rows, args.seconds, args.time_scale)
    if not requests:
        raise InputError("no requests left after slicing", file=str(workload))

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the directory: {exc.strerror}", file=str(out), field="out") from None
    pythons = per_engine(args.engine_python, "=", engines, "engine-python")
    fixes = per_engine(args.fix, ":", engines, "fix")
    engine_args: dict[str, list[str]] = {}
    for engine, items in per_engine(args.engine_arg, ":", engines, "engine-arg").items():
        try:
            engine_args[engine] = [word for item in items for word in shlex.split(item)]
        except ValueError as exc:
            raise InputError(f"{exc} in {items}", field="engine-arg") from None
    model = args.model
    simulated = is_simulated(engines)
    if simulated:
        shape = get_shape(args.model_shape or args.model or "llama-3.1-8b")
        model = shape.name
    elif args.model_shape:
        from tuner.models.stub import stub_model_dir

        shape = get_shape(args.model_shape)
        model = model or str(stub_model_dir(shape.name))
    else:
        if not model:
            raise InputError("give --model (path or hub id) or --model-shape", field="model")
        shape = None
    env: dict[str, list[tuple[str, str]]] = {}
    for engine, items in per_engine(args.engine_env, ":", engines, "engine-env").items():
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"expected KEY=VALUE, got '{item}'", field="engine-env")
            env.setdefault(engine, []).append((key, value))
    longest = check_requests(requests, workload, args.max_model_len)
    max_model_len = args.max_model_len or -(-longest // 1024) * 1024
    if shape is not None and max_model_len > shape.max_position:
        raise InputError(f"the workload needs {longest} tokens of context; {shape.name} has {shape.max_position} "
                         "(slice the workload or pass --max-model-len)", field="max-model-len")
    gpu = args.gpu
    if gpu is None and needs_gpu(engines):
        from tuner.hardware.inventory import detect

        found = detect()
        gpu = found[0].preset if found else None
        if found:
            print(f"GPUs: {len(found)} × {found[0].name} ({found[0].memory_mib} MiB, compute capability "
                  f"{found[0].compute_capability[0]}.{found[0].compute_capability[1]})")
    model_label = Path(model).name if model else "model"
    study_name = check_study_name(args.study_name
                                  or f"{'-'.join(engines)}-{model_label}-{workload.stem}-{args.gpus}gpu")
    storage_url = args.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    options = TuneOptions(
        workload=workload, requests=requests, workload_digest=trace_digest(workload), engines=engines,
        model=model, shape=shape, gpus=args.gpus,
        gpu=gpu or (get_engine(engines[0]).default_gpu if simulated else None),
        trials=trials, budget_s=budget, objectives=objectives, slo=slo, sampler=args.sampler, seed=args.seed,
        study_name=study_name, storage=storage_url,
        out_dir=out, mlflow_uri=None if args.no_mlflow else (args.mlflow_uri or
                                                              f"sqlite:///{(out / 'mlflow.db').resolve()}"),
        ray_address=args.ray_address, host=host, space_path=args.space, fix=fixes.get("", []),
        fix_by={e: f for e, f in fixes.items() if e}, exclude=args.exclude,
        endpoint=args.endpoint, concurrency=args.concurrency, max_concurrency=args.max_concurrency,
        sim_time_scale=args.sim_time_scale, startup_timeout_s=args.startup_timeout, cold_start=args.cold_start,
        engine_python=(pythons.get("") or [sys.executable])[-1], engine_args=engine_args.get("", []),
        engine_env=env.get("", []), engine_pythons={e: p[-1] for e, p in pythons.items() if e},
        engine_args_by={e: a for e, a in engine_args.items() if e}, engine_env_by={e: v for e, v in env.items() if e},
        vocab_size=shape.vocab_size if shape else 32000, max_model_len=max_model_len, quiet=args.quiet,
        dummy_weights=bool(args.model_shape) and not simulated,
        prune=not args.no_prune, halving=args.halving, eta=args.eta, finalists=finalists, repeats=args.repeats,
        capacity=args.capacity, attainment=args.attainment, prescreen=args.prescreen,
        prescreen_keep=args.prescreen_keep,
        selection={"rows": args.rows, "seconds": args.seconds, "time_scale": args.time_scale})
    tuner = Tuner(options)
    if host not in ("127.0.0.1", "localhost"):
        print(f"note: trial servers listen on {host}, reachable from other machines; each still requires "
              "its own random API key", file=sys.stderr)
    storage = open_store(storage_url)
    if args.ray_address is None:
        ray_local_only()
    with StudyLock.acquire(storage, study_name, tuner.objectives.directions):
        study = tuner.run()
        tuner.report(study)
    print(closing_line(study_name, options.storage))
    return 0


def closing_line(study_name: str, storage_url: str) -> str:
    return f"\nexport again with: tune export --study {study_name} --storage {redact_url(storage_url)}"
