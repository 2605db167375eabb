"""`tune sim-serve`: serve the simulated engine, with vLLM's flag names where vLLM has the flag."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tuner.errors import InputError
from tuner.simulator.config import (
    ATTENTION_BACKENDS,
    FAULTS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    SIM_ENGINES,
    SimConfig,
    parse_speculative_config,
    parse_token_count,
)
from tuner.simulator.constants import PerfConstants, load_constants

API_KEY_ENV = "SERVETUNE_API_KEY"  # the key, kept off the command line


def _token_count(text: str) -> int:
    try:
        return parse_token_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def expand_argv(argv: list[str]) -> list[str]:
    """`--config FILE` (YAML of flag: value, as `tune export --format yaml` writes it) becomes flags put first,
    so flags given on the command line win over the file (as with vLLM's --config)."""
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise InputError("expected a YAML file", field="--config")
    from tuner.yamlfile import read_yaml

    path = Path(argv[at + 1])
    _, data = read_yaml(path, "config file")
    if not isinstance(data, dict):
        raise InputError("must be a mapping of flag: value", file=str(path))
    tokens: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).lstrip("-")
        if value is True:
            tokens.append(flag)
        elif value is False:
            tokens.append(f"--no-{flag[2:]}")
        else:
            tokens += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return tokens + argv[:at] + argv[at + 2:]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML of flag: value (as `tune export --format yaml` writes); flags given here win")
    sim = parser.add_argument_group("simulated hardware and model")
    sim.add_argument("--model-shape", default="llama-3.1-8b", metavar="NAME",
                     help="model shape preset (tuner/models/shapes.py), default llama-3.1-8b")
    sim.add_argument("--gpu", default="h100", metavar="NAME", help="GPU preset (tuner/hardware/gpus.py), default h100")
    sim.add_argument("--time-scale", type=float, default=1.0, metavar="K",
                     help="simulated time runs K times faster than wall-clock (default 1)")
    sim.add_argument("--startup-seconds", type=float, default=20.0, metavar="S",
                     help="simulated load and warm-up time before the port opens (default 20)")
    sim.add_argument("--sim-engine", choices=SIM_ENGINES, default="vllm",
                     help="whose scheduler to simulate: vllm (mixed batches) or sglang (prefill first); "
                          "the flags keep vLLM's names (--max-num-seqs = SGLang's --max-running-requests, "
                          "--max-num-batched-tokens = its --chunked-prefill-size)")
    sim.add_argument("--sim-engine-version", default=None, metavar="V",
                     help="engine version whose unsupported flag combinations to refuse (default: newest known)")
    sim.add_argument("--calibration", default=None, metavar="JSON",
                     help="performance-model constants fitted to real trials (servetune calibration JSON)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--sim-acceptance-rate", type=float, default=None, metavar="A",
                     help="speculative-decoding acceptance rate, overriding the per-method table")
    sim.add_argument("--fault", choices=FAULTS, default="none", help="inject a failure (robustness tests)")
    sim.add_argument("--fault-after-requests", type=int, default=20, metavar="N",
                     help="an under-load fault strikes when the N-th generation request arrives (default 20)")

    server = parser.add_argument_group("server (as vllm serve)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME")
    server.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on every route but /health (better: set "
                             f"{API_KEY_ENV}, which `ps` does not show)")

    engine = parser.add_argument_group("engine (as vllm serve)")
    engine.add_argument("--max-num-seqs", type=int, default=None)
    engine.add_argument("--max-num-batched-tokens", type=_token_count, default=None)
    engine.add_argument("--max-model-len", type=_token_count, default=None)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    engine.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    engine.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    engine.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    engine.add_argument("--enable-expert-parallel", "-ep", action="store_true")
    engine.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    engine.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default="none")
    engine.add_argument("--speculative-config", "-sc", default=None, metavar="JSON",
                        help='e.g. \'{"method":"ngram","num_speculative_tokens":4}\'; '
                             'methods ngram, eagle, eagle3, draft_model')
    engine.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    engine.add_argument("--block-size", type=int, default=16)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The `SimConfig` for parsed flags; bad values raise `InputError` (one line, exit 2)."""
    return SimConfig(
        model_shape=args.model_shape, gpu=args.gpu, served_model_name=tuple(args.served_model_name or ()),
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
        speculative=parse_speculative_config(args.speculative_config, args.sim_acceptance_rate),
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, block_size=args.block_size, max_model_len=args.max_model_len,
        time_scale=args.time_scale, startup_seconds=args.startup_seconds, seed=args.seed, fault=args.fault,
        fault_after_requests=args.fault_after_requests, engine=args.sim_engine,
        engine_version=args.sim_engine_version,
        constants=load_constants(args.calibration) if args.calibration else PerfConstants())


def run(args: argparse.Namespace) -> int:
    from tuner.simulator.server import serve  # aiohttp only when serving

    return serve(config_from_args(args))
