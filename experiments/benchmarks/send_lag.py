"""How precisely does `tune bench` send on schedule? Open-loop Poisson arrivals at rising rates.

Starts `FastStreamTestServer` (aiohttp; answers every completion at once with three SSE token
chunks, a usage chunk and [DONE]) in a subprocess on 127.0.0.1, replays Poisson arrivals against it
for a few seconds per rate, and prints send lag (actual send - scheduled send, wall-clock) and the
achieved send rate. The server shares the machine's cores with the client, as a simulator would.

    python experiments/benchmarks/send_lag.py [--rates 50,100,...] [--seconds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tuner.loadgen.replay import BenchConfig, run_bench_sync
from tuner.workload.request import TraceRequest

MODEL = "fast-stream-test"
LAG_LIMIT_MS = 5.0


def serve_fast_stream_test_server() -> None:
    """FastStreamTestServer: print `PORT n`, then answer until killed."""
    import asyncio

    from aiohttp import web

    def event(obj: object) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    answer = b"".join(event({"choices": [{"index": 0, "text": f"t{i}",
                                          "finish_reason": "length" if i == 2 else None}]})
                      for i in range(3))
    answer += event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3,
                                              "total_tokens": 7}})
    answer += b"data: [DONE]\n\n"

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL}]})

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="text/event-stream")

    async def run_forever() -> None:
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
        print(f"PORT {runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run_forever())


def poisson_trace(rate: float, seconds: float, seed: int) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 2) + 10)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [TraceRequest(arrival_s=float(a), input_tokens=4, output_tokens=3)
            for a in arrivals[arrivals < seconds]]


def burst_trace(size: int, every_s: float, seconds: float, prompt_tokens: int) -> list[TraceRequest]:
    """Mooncake-like bursts: `size` long-prompt requests arriving together every `every_s`."""
    return [TraceRequest(arrival_s=k * every_s, input_tokens=prompt_tokens, output_tokens=3)
            for k in range(int(seconds / every_s)) for _ in range(size)]


def measure(url: str, rate: float, seconds: float, seed: int,
            trace: list[TraceRequest] | None = None) -> dict:
    trace = trace or poisson_trace(rate, seconds, seed)
    result = run_bench_sync(BenchConfig(url=url, model=MODEL, vocab_size=1000, timeout_s=30), trace)
    sent = sorted(r.sent_s for r in result.rows)
    lags_ms = np.array([r.send_lag_s for r in result.rows]) * 1000.0
    return {
        "requests": len(trace),
        "trace_rate": (len(trace) - 1) / max(trace[-1].arrival_s - trace[0].arrival_s, 1e-9),
        "achieved": (len(sent) - 1) / (sent[-1] - sent[0]),
        "lag_p50": float(np.percentile(lags_ms, 50)),
        "lag_p99": float(np.percentile(lags_ms, 99)),
        "lag_max": float(lags_ms.max()),
        "failed": result.summary.failed,
    }


def measure_repeated(url: str, rate: float, seconds: float, seed: int, repeats: int) -> dict:
    """Medians over repeats (each its own Poisson sample); max of the maxima; failures summed."""
    runs = [measure(url, rate, seconds, seed + r) for r in range(repeats)]
    row = {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
    row.update(rate=rate, requests=sum(run["requests"] for run in runs),
               lag_max=max(run["lag_max"] for run in runs),
               failed=sum(run["failed"] for run in runs),
               p99s=[run["lag_p99"] for run in runs])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rates", default="50,100,200,400,800,1600,3200,6400")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per rate (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.serve:
        serve_fast_stream_test_server()
        return 0
    rates = [float(r) for r in args.rates.split(",")]
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            print(f"test server did not start: {line!r}", file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        print(f"send lag of tune bench, open loop, Poisson arrivals, {args.seconds:g} s per run; "
              "FastStreamTestServer in a subprocess on the same machine")
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}, "
              f"load average {os.getloadavg()[0]:.2f} at start; median of {args.repeats} runs per rate")
        print(f"{'offered/s':>10} {'requests':>9} {'trace/s':>9} {'achieved/s':>11} "
              f"{'lag p50 ms':>11} {'lag p99 ms':>11} {'lag max ms':>11} {'failed':>7}  p99 per run")
        best = previous = None
        for rate in rates:
            row = measure_repeated(url, rate, args.seconds, args.seed, args.repeats)
            print(f"{row['rate']:>10.0f} {row['requests']:>9d} {row['trace_rate']:>9.1f} "
                  f"{row['achieved']:>11.1f} {row['lag_p50']:>11.3f} {row['lag_p99']:>11.3f} "
                  f"{row['lag_max']:>11.3f} {row['failed']:>7d}  "
                  f"{' '.join(f'{p:.2f}' for p in row['p99s'])}", flush=True)
            if row["lag_p99"] < LAG_LIMIT_MS and row["failed"] == 0 and best == previous:
                best = rate
            previous = rate
        burst = measure(url, 0, 0, 0, burst_trace(16, 0.25, 2 * args.seconds, 16000))
        print(f"bursts of 16 requests with 16k-token prompts every 0.25 s ({burst['requests']} "
              f"requests): lag p50 {burst['lag_p50']:.3f} ms, p99 {burst['lag_p99']:.3f} ms, "
              f"max {burst['lag_max']:.3f} ms, failed {burst['failed']}")
        verdict = f"{best:.0f} req/s" if best is not None else f"none of {args.rates}"
        print(f"highest offered rate with median send-lag p99 < {LAG_LIMIT_MS:g} ms, at it and every "
              f"lower rate, and no failures: {verdict}")
        print(f"load average {os.getloadavg()[0]:.2f} at end")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
