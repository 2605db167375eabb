"""`tune bench`: replay a workload against a running OpenAI-compatible server and summarize it."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path

from tuner.errors import InputError
from tuner.loadgen.metrics import BenchSummary
from tuner.loadgen.replay import BenchConfig, ProgressSnapshot, run_bench_sync, write_results
from tuner.loadgen.slo import parse_slo


def _positive(kind: type):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
        return value
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--workload", required=True, metavar="FILE", help="trace file to replay")
    parser.add_argument("--format", dest="trace_format", metavar="F", help="trace format (default: detect)")
    parser.add_argument("--rows", type=_positive(int), metavar="N", help="replay the first N requests")
    parser.add_argument("--seconds", type=_positive(float), metavar="T",
                        help="replay requests arriving in the first T seconds of trace time")
    parser.add_argument("--time-scale", type=_positive(float), default=1.0, metavar="K",
                        help="replay the trace K times faster (default 1)")
    parser.add_argument("--clock-scale", type=_positive(float), default=1.0, metavar="K",
                        help="the server's clock runs K times faster than wall-clock (simulator "
                             "--time-scale): arrivals compressed by K, latencies reported × K")
    parser.add_argument("--concurrency", type=_positive(int), metavar="N",
                        help="closed loop: keep N requests in flight, ignoring arrival times")
    parser.add_argument("--max-concurrency", type=_positive(int), metavar="N",
                        help="open loop: at most N in flight; others wait (not counted in latency)")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--model", metavar="M", help="model name (default: first from /v1/models)")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    parser.add_argument("--slo", metavar="SPEC", help="e.g. ttft_p99=800ms,tpot_p99=60ms,e2e_p90=5s")
    parser.add_argument("--vocab-size", type=_positive(int), default=32000, metavar="V",
                        help="synthesized prompt token ids are drawn below V (default 32000)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="send N warm-up requests first, excluded from results")
    parser.add_argument("--timeout", type=_positive(float), default=600.0, metavar="S",
                        help="per-request timeout in seconds (default 600)")
    parser.add_argument("--out", metavar="DIR", help="results folder (default servetune-runs/bench-<time>/)")
    parser.add_argument("--seed", type=int, default=0, help="prompt synthesis seed (default 0)")
    parser.add_argument("--wait-ready", type=_positive(float), metavar="S",
                        help="first wait up to S seconds for the server to answer /v1/models (or /health)")


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise InputError(f"environment variable '{var}' is not set", field="--api-key-env")
    return key


class _ProgressLine:
    """n/N done line on stderr, at most once a second."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()

    def __call__(self, snap: ProgressSnapshot) -> bool:
        p99 = f", ttft p99 {snap.p99_ttft_ms:.0f} ms" if snap.p99_ttft_ms is not None else ""
        failed = f", {snap.failed} failed" if snap.failed else ""
        print(f"bench: {snap.completed + snap.failed}/{self.total} done{failed}, "
              f"{snap.in_flight} in flight, {snap.elapsed_s:.0f} s elapsed{p99}",
              file=sys.stderr, flush=True)
        return False


def wait_ready(url: str, timeout_s: float, api_key: str | None = None, poll_s: float = 0.5) -> float:
    """Poll /v1/models, then /health, until one answers 200; the seconds waited. InputError on timeout."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = "no answer"
    while True:
        for path in ("/v1/models", "/health"):
            try:
                with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + path, headers=headers),
                                            timeout=max(poll_s, 1.0)) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except urllib.error.HTTPError as exc:
                last = f"{path} answered {exc.code}"
            except (OSError, ValueError) as exc:
                last = str(getattr(exc, "reason", exc))
        if time.monotonic() - started >= timeout_s:
            raise InputError(f"server at {url} not ready after {timeout_s:g} s ({last})", field="--wait-ready")
        time.sleep(poll_s)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_summary(summary: BenchSummary, clock_scale: float = 1.0) -> str:
    width = 50
    lines = [" Serving Benchmark Result ".center(width, "=")]

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<40}{value}")

    row("Successful requests:", summary.completed)
    row("Failed requests:", summary.failed)
    row("Benchmark duration (s):", f"{summary.duration_s:.2f}")
    row("Total input tokens:", summary.total_input_tokens)
    row("Total generated tokens:", summary.total_output_tokens)
    row("Request throughput (req/s):", f"{summary.request_throughput:.2f}")
    row("Output token throughput (tok/s):", f"{summary.output_throughput:.2f}")
    row("Total token throughput (tok/s):", f"{summary.total_token_throughput:.2f}")
    if summary.goodput is not None:
        row("Request goodput (req/s):", f"{summary.goodput:.2f}")
    if summary.output_token_mismatches:
        row("Outputs not of requested length:", summary.output_token_mismatches)
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2e": "End-to-end Latency"}
    for key, title in titles.items():
        lines.append(f" {title} ".center(width, "-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99"),
                            ("max", "Max")):
            row(f"{label} {key.upper()} (ms):", _ms(getattr(summary, f"{stat}_{key}_ms")))
    lines.append(" Client ".center(width, "-"))
    row("Send lag P50 (ms, wall-clock):", _ms(summary.p50_send_lag_ms))
    row("Send lag P99 (ms, wall-clock):", _ms(summary.p99_send_lag_ms))
    if summary.mean_slot_wait_ms:
        row("Mean slot wait (ms):", _ms(summary.mean_slot_wait_ms))
        row("P99 slot wait (ms):", _ms(summary.p99_slot_wait_ms))
    if summary.slo_met:
        lines.append(" SLO ".center(width, "-"))
        for name, met in summary.slo_met.items():
            row(f"{name}:", f"{_ms(summary.slo_value_ms[name])} ms  {'met' if met else 'MISSED'}")
    if clock_scale != 1.0:
        lines.append(f"(latencies and throughputs in server time: wall-clock × {clock_scale:g})")
    lines.append("=" * width)
    return "\n".join(lines)


def _print_errors(errors: list[str], kinds: int = 3) -> None:
    """The commonest kinds of failure (messages alike but for their numbers), one example each."""
    kind_of = [re.sub(r"\d+", "#", error) for error in errors]
    example = dict(zip(kind_of, errors))
    for kind, count in Counter(kind_of).most_common(kinds):
        print(f"bench: {count} failed like: {example[kind]}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from tuner.workload.transform import load_workload  # written alongside; import when used

    if args.warmup < 0:
        raise InputError(f"must be >= 0, got {args.warmup}", field="--warmup")
    config = BenchConfig(
        url=args.url, model=args.model, endpoint=args.endpoint, api_key=_api_key(args.api_key_env),
        concurrency=args.concurrency, max_concurrency=args.max_concurrency,
        time_scale=args.time_scale, clock_scale=args.clock_scale, vocab_size=args.vocab_size,
        seed=args.seed, timeout_s=args.timeout, warmup_requests=args.warmup,
        slo=parse_slo(args.slo) if args.slo else None,
    )
    # --time-scale goes to the replay, not the loader: --seconds counts trace time either way
    requests = load_workload(args.workload, args.trace_format, args.rows, args.seconds)
    if args.wait_ready:
        waited = wait_ready(config.url, args.wait_ready, config.api_key)
        print(f"bench: server ready after {waited:.1f} s", file=sys.stderr, flush=True)
    out_dir = Path(args.out or f"servetune-runs/bench-{datetime.now():%Y%m%d-%H%M%S}")
    mode = f"closed loop, {config.concurrency} in flight" if config.concurrency else "open loop"
    print(f"bench: {len(requests)} requests to {config.url} ({mode})", file=sys.stderr, flush=True)
    result = run_bench_sync(config, requests, on_progress=_ProgressLine(len(requests)))
    print(format_summary(result.summary, config.clock_scale))
    _print_errors([row.error for row in result.rows if row.error is not None])
    rows_path, summary_path = write_results(result, out_dir)
    print(f"bench: wrote {rows_path} and {summary_path}", file=sys.stderr)
    return 0 if result.summary.completed else 1
