"""`tune sim-serve` as a real process on 127.0.0.1, driven by a small streaming aiohttp client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
MODEL = "sim-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_refuses(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@dataclass
class RunningServer:
    url: str
    log: Path
    refused_while_loading: bool
    pid: int


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "server.log"
    argv = [sys.executable, "-m", "tuner", "sim-serve", "--port", str(port), "--time-scale", "20",
            "--startup-seconds", "40", "--served-model-name", MODEL,
            "--data-parallel-size", "2", "--max-model-len", "4096"]
    with log.open("w") as handle:
        process = subprocess.Popen(argv, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "SERVETUNE_API_KEY": API_KEY})
    try:
        wait_for(lambda: "Loading simulated weights" in log.read_text(), 30, "the loading log line")
        refused = port_refuses(port)  # 1 s of wall-clock loading still ahead
        wait_for(lambda: "Application startup complete." in log.read_text() or process.poll() is not None, 30,
                 "start-up")
        assert process.poll() is None, log.read_text()
        yield RunningServer(f"http://127.0.0.1:{port}", log, refused, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)


async def sse_events(response: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE body, in order, checking the framing."""
    body = (await response.read()).decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events[:3]
    return [event[len("data: "):] for event in events]


def post(server: RunningServer, path: str, body: object, headers: dict | None = None):
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + path, json=body, headers=AUTH if headers is None else headers) as r:
                if r.content_type == "text/event-stream":
                    return r.status, await sse_events(r)
                return r.status, await r.json()
    return asyncio.run(go())


def get(server: RunningServer, path: str, headers: dict | None = None):
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + path, headers=AUTH if headers is None else headers) as r:
                return r.status, await r.text()
    return asyncio.run(go())


def completion_stream(server: RunningServer, prompt, max_tokens: int, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    status, events = post(server, "/v1/completions", body)
    assert status == 200
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


# ---- readiness and labelling ---------------------------------------------------------------------

def test_port_refuses_connections_until_ready_then_health_is_200(server):
    assert server.refused_while_loading
    assert get(server, "/health")[0] == 200


def test_is_labelled_a_simulator(server):
    status, text = get(server, "/v1/models", AUTH)
    models = json.loads(text)["data"]
    assert status == 200 and [m["id"] for m in models] == [MODEL]
    assert models[0]["owned_by"] == "servetune-simulator"
    log = server.log.read_text()
    assert "SIMULATED ENGINE (servetune performance model, not a GPU)" in log
    assert "GPU KV cache size:" in log and "Maximum concurrency for 4,096 tokens per request" in log


# ---- generation ----------------------------------------------------------------------------------

def test_completions_stream_exactly_max_tokens_with_usage(server):
    chunks = completion_stream(server, list(range(500, 800)), 37)
    *content, usage = chunks
    words = "".join(chunk["choices"][0]["text"] for chunk in content).split()
    assert len(words) == 37 and all(word.startswith("w") for word in words)
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 300, "completion_tokens": 37, "total_tokens": 337}
    assert all(chunk["object"] == "text_completion" and chunk["model"] == MODEL for chunk in chunks)


def test_chat_stream_starts_with_the_role_then_streams_content(server):
    body = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "say twelve words please"}],
            "max_tokens": 12, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    status, events = post(server, "/v1/chat/completions", body)
    assert status == 200 and events[-1] == "[DONE]"
    first, *content, usage = [json.loads(event) for event in events[:-1]]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len("".join(c["choices"][0]["delta"]["content"] for c in content).split()) == 12
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 6  # words of the messages
    assert usage["usage"]["completion_tokens"] == 12


def test_non_streaming_completion_and_chat(server):
    status, body = post(server, "/v1/completions", {"prompt": "one two three", "max_tokens": 9, "ignore_eos": True})
    assert status == 200
    assert len(body["choices"][0]["text"].split()) == 9
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
    status, body = post(server, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True})
    assert status == 200 and body["object"] == "chat.completion"
    assert len(body["choices"][0]["message"]["content"].split()) == 4


def test_without_ignore_eos_stops_between_min_tokens_and_max_tokens(server):
    for seed_prompt in range(5):
        chunks = completion_stream(server, [seed_prompt + 100] * 20, 400, ignore_eos=False, min_tokens=30)
        produced = chunks[-1]["usage"]["completion_tokens"]
        reason = chunks[-2]["choices"][0]["finish_reason"]
        assert 30 <= produced <= 400
        assert reason == ("length" if produced == 400 else "stop")


# ---- errors -------------------------------------------------------------------------------------

def test_api_key_is_required_on_every_route_but_health_and_never_returned(server):
    status, body = post(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2}, headers={})
    assert status == 401
    status, _ = post(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2},
                     headers={"Authorization": "Bearer wrong"})
    assert status == 401
    for path in ("/v1/models", "/metrics", "/sim/info", "/version", "/no/such/route"):
        assert get(server, path, headers={})[0] == 401, path
        assert get(server, path, headers={"Authorization": f"Bearer {API_KEY}x"})[0] == 401, path
    assert post(server, "/reset_prefix_cache", {}, headers={})[0] == 401
    assert get(server, "/health", headers={})[0] == 200
    status, info = get(server, "/sim/info")
    assert status == 200 and "max_model_len" in info and API_KEY not in info and "api_key" not in info
    argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
    assert API_KEY not in argv  # the fixture gives the key through SERVETUNE_API_KEY, which `ps` does not show


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"prompt": list(range(4096)), "max_tokens": 1}, "prompt"),
    ({"prompt": list(range(4000)), "max_tokens": 200}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": 2, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [1, "x"], "max_tokens": 2}, "prompt"),
    ({"prompt": "   ", "max_tokens": 2}, "prompt"),
])
def test_invalid_requests_get_400_json(server, body, param):
    status, reply = post(server, "/v1/completions", body)
    assert status == 400
    assert reply["error"]["code"] == 400 and reply["error"]["param"] == param and reply["error"]["message"]


def test_unknown_model_is_404(server):
    status, reply = post(server, "/v1/completions", {"model": "gpt-9", "prompt": [1], "max_tokens": 1})
    assert status == 404 and "gpt-9" in reply["error"]["message"]


# ---- metrics and data parallelism ---------------------------------------------------------------

def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """Summed samples per metric name, and HELP texts; fails on any line that is not Prometheus text."""
    samples: dict[str, float] = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            assert line.split()[-1] in ("gauge", "counter")
        else:
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            assert series.endswith("}") and name.startswith("sim:")
            samples[name] = samples.get(name, 0.0) + float(value)
    return samples, helps


def test_metrics_parse_and_count_the_work_done(server):
    before, _ = parse_metrics(get(server, "/metrics")[1])
    prompt = list(range(1000, 1400))
    for _ in range(2):  # the second identical prompt hits the prefix cache on the replica that saw it
        completion_stream(server, prompt, 5, model=MODEL)

    async def concurrent():
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async def one(i):
                async with session.post(server.url + "/v1/completions",
                                        json={"prompt": [i + 7] * 50, "max_tokens": 30, "ignore_eos": True}) as r:
                    return (await r.json())["usage"]["completion_tokens"]
            return await asyncio.gather(*(one(i) for i in range(8)))
    assert asyncio.run(concurrent()) == [30] * 8

    text = get(server, "/metrics")[1]
    after, helps = parse_metrics(text)
    for name in ("sim:num_requests_running", "sim:num_requests_waiting", "sim:kv_cache_usage_perc",
                 "sim:num_preemptions_total", "sim:prefix_cache_queries_total", "sim:prefix_cache_hits_total",
                 "sim:prompt_tokens_total", "sim:generation_tokens_total", "sim:spec_decode_num_draft_tokens_total",
                 "sim:spec_decode_num_accepted_tokens_total", "sim:engine_steps_total",
                 "sim:kv_cache_capacity_tokens", "sim:simulated_seconds_total"):
        assert name in after and "simulated engine, not a GPU" in helps[name]
    assert after["sim:generation_tokens_total"] - before["sim:generation_tokens_total"] == 2 * 5 + 8 * 30
    assert after["sim:prompt_tokens_total"] - before["sim:prompt_tokens_total"] == 2 * 400 + 8 * 50
    assert after["sim:prefix_cache_hits_total"] - before["sim:prefix_cache_hits_total"] >= 384
    assert after["sim:simulated_seconds_total"] > before["sim:simulated_seconds_total"]
    # two data-parallel replicas, both given work by least-loaded routing
    successes = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("sim:request_success_total{")]
    assert len(successes) == 2 and all(count > 0 for count in successes)
