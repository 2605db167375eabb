"""The streaming client and the replay against a real local HTTP server that plays scripted streams."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import pytest
from aiohttp import web

from tuner.loadgen.cli import add_arguments, run
from tuner.loadgen.client import SseDecoder, StreamAccumulator
from tuner.loadgen.replay import BenchConfig, ProgressSnapshot, run_bench_sync
from tuner.loadgen.slo import parse_slo
from tuner.workload.prompts import token_ids_for
from tuner.workload.request import TraceRequest


def _sse(obj: object) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


class ScriptedStreamServer:
    """OpenAI-style streaming server on 127.0.0.1 whose behaviour is picked by the request's model.

    Records every request body and the most requests it ever had in flight. Scripts:
    `plain` one token per chunk + usage; `split` the same bytes cut into 7-byte TCP writes with
    `\\r\\n` line ends and `:` comments; `chat-role` a role-only first chunk; `pairs` two tokens per
    chunk; `no-usage` no usage chunk; `mid-error` an error object after two tokens; `http-500`;
    `truncated` no [DONE]. `hold_s` delays every response (to make requests overlap).
    """

    def __init__(self, hold_s: float = 0.0) -> None:
        self.hold_s = hold_s
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def __enter__(self) -> ScriptedStreamServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "plain"}, {"id": "split"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            script = body["model"]
            if script == "http-500":
                return web.json_response({"error": {"message": "boom", "code": 500}}, status=500)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            payload = self._events(script, body)
            if script == "split":
                payload = payload.replace(b"\n", b"\r\n")
                for start in range(0, len(payload), 7):
                    await response.write(payload[start:start + 7])
                    await asyncio.sleep(0.001)
            else:
                await response.write(payload)
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1

    @staticmethod
    def _events(script: str, body: dict) -> bytes:
        n = body["max_tokens"]
        chat = "messages" in body
        prompt_tokens = len(body.get("prompt") or []) or 5

        def chunk(text: str, finish: str | None = None) -> dict:
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            return {"id": "x", "choices": [choice], "usage": None}

        usage = {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                          "total_tokens": prompt_tokens + n,
                                          "prompt_tokens_details": {"cached_tokens": 3}}}
        out = b""
        if script == "split":
            out += b": keep-alive comment\n\n"
        if script == "chat-role":
            out += _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]})
        if script == "mid-error":
            out += _sse(chunk("a")) + _sse(chunk("b"))
            out += _sse({"error": {"message": "engine died", "type": "InternalServerError"}})
            return out + _sse(b"[DONE]")
        if script == "pairs":
            for i in range(0, n, 2):
                out += _sse(chunk(f"t{i} t{i + 1} ", "length" if i + 2 >= n else None))
        else:
            for i in range(n):
                out += _sse(chunk(f"t{i} ", "length" if i == n - 1 else None))
        if script != "no-usage":
            out += _sse(usage)
        if script == "truncated":
            return out
        return out + _sse(b"[DONE]")


def _one(server: ScriptedStreamServer, model: str, output_tokens: int = 5, **config):
    request = TraceRequest(arrival_s=0.0, input_tokens=12, output_tokens=output_tokens,
                           prefix_blocks=(4,), block_tokens=8)
    result = run_bench_sync(BenchConfig(url=server.url, model=model, **config), [request])
    assert len(result.rows) == 1
    return result, result.rows[0]


# --- SSE decoding and the accumulator, fed directly ---------------------------------------------

STREAM = (b": ping\n\ndata: {\"a\": 1}\r\n\r\nevent: message\ndata: line1\ndata: line2\n\n"
          b"data:{\"b\": 2}\n\ndata: [DONE]\n\n")


def test_sse_decoder_same_payloads_whatever_the_split():
    whole = SseDecoder().feed(STREAM)
    assert whole == ['{"a": 1}', "line1\nline2", '{"b": 2}', "[DONE]"]
    for cut in range(1, len(STREAM)):
        decoder = SseDecoder()
        assert decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]) == whole
    byte_by_byte = SseDecoder()
    assert [p for i in range(len(STREAM)) for p in byte_by_byte.feed(STREAM[i:i + 1])] == whole


def test_sse_decoder_keeps_an_unterminated_last_event():
    decoder = SseDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2") == ["1"]
    assert decoder.close() == ["2"]


def test_role_only_chat_chunk_is_not_the_first_token():
    acc = StreamAccumulator(chat=True, sent_at=10.0)
    role = json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    token = json.dumps({"choices": [{"delta": {"content": "hi"}}]})
    usage = json.dumps({"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 7}})
    acc.feed([role], 10.5)
    acc.feed([token], 11.0)
    acc.feed([token], 11.25)
    acc.feed([usage, "[DONE]"], 11.5)
    acc.finish()
    assert acc.error is None
    assert acc.first_token_at - acc.sent_at == 1.0
    assert acc.gaps == [0.25]
    assert (acc.output_tokens, acc.usage_prompt_tokens) == (2, 7)


def test_completion_chunks_empty_text_and_finish_marker():
    acc = StreamAccumulator(chat=False, sent_at=0.0)
    acc.feed([json.dumps({"choices": [{"text": "", "finish_reason": None}]})], 1.0)  # held-back bytes
    acc.feed([json.dumps({"choices": [{"text": "x", "finish_reason": None}]})], 2.0)
    acc.feed([json.dumps({"choices": [{"text": "", "finish_reason": "length"}]})], 3.0)  # marker
    acc.feed(["[DONE]"], 3.0)
    acc.finish()
    assert (acc.first_token_at, acc.gaps, acc.output_tokens) == (1.0, [1.0], 2)


def test_accumulator_errors():
    acc = StreamAccumulator(chat=False, sent_at=0.0)
    acc.feed(["not json"], 1.0)
    assert "unparseable" in acc.error
    acc = StreamAccumulator(chat=False, sent_at=0.0)
    acc.feed([json.dumps({"object": "error", "message": "bad"})], 1.0)
    assert acc.error == "server error mid-stream: bad"
    acc = StreamAccumulator(chat=False, sent_at=0.0)
    acc.feed([json.dumps({"choices": [], "usage": {"completion_tokens": 0}}), "[DONE]"], 1.0)
    acc.finish()
    assert acc.error == "stream carried no generated text"


# --- the client against the scripted server ----------------------------------------------------

def test_payload_forces_exact_length_and_streams_usage():
    with ScriptedStreamServer() as server:
        _, row = _one(server, "plain", output_tokens=5, vocab_size=1000, seed=3)
        body = server.bodies[0]
    request = TraceRequest(arrival_s=0.0, input_tokens=12, output_tokens=5, prefix_blocks=(4,),
                           block_tokens=8)
    assert body["prompt"] == token_ids_for(request, 0, 1000, 3)
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (5, 5, True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0
    assert row.ok and row.output_tokens == 5 and row.prompt_tokens == 12 and row.cached_tokens == 3


def test_chunks_split_across_tcp_writes():
    with ScriptedStreamServer() as server:
        _, row = _one(server, "split", output_tokens=6)
    assert row.error is None
    assert row.output_tokens == 6
    assert len(row.itl_s) == 5
    assert 0 <= row.ttft_s <= row.e2e_s
    assert row.tpot_s == pytest.approx((row.e2e_s - row.ttft_s) / 5)


def test_chat_role_chunk_not_counted_and_trace_messages_sent():
    messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"})
    with ScriptedStreamServer() as server:
        _, row = _one(server, "chat-role", output_tokens=4, endpoint="chat")
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", endpoint="chat"),
                                [TraceRequest(0.0, 2, 3, messages=messages)])
        bodies = server.bodies
    assert row.ok and row.output_tokens == 4
    assert len(row.itl_s) == 3  # four content chunks; the role chunk is no token
    assert bodies[0]["messages"][0]["role"] == "user" and bodies[0]["messages"][0]["content"]
    assert bodies[1]["messages"] == list(messages)
    assert result.rows[0].output_tokens == 3


def test_usage_gives_tokens_when_chunks_carry_several():
    with ScriptedStreamServer() as server:
        _, row = _one(server, "pairs", output_tokens=6)
    assert row.output_tokens == 6
    assert len(row.itl_s) == 2  # three chunks
    assert row.tpot_s == pytest.approx((row.e2e_s - row.ttft_s) / 5)


def test_without_usage_tokens_are_counted_from_chunks():
    with ScriptedStreamServer() as server:
        _, row = _one(server, "no-usage", output_tokens=4)
    assert row.ok and row.output_tokens == 4 and row.prompt_tokens == 12  # prompt from the trace


def test_mid_stream_error_fails_the_request():
    with ScriptedStreamServer() as server:
        result, row = _one(server, "mid-error", output_tokens=5)
    assert row.error == "server error mid-stream: engine died"
    assert row.e2e_s is None and row.tpot_s is None
    assert (result.summary.completed, result.summary.failed) == (0, 1)


def test_http_500_before_the_stream():
    with ScriptedStreamServer() as server:
        _, row = _one(server, "http-500")
    assert row.error == "HTTP 500: boom"
    assert row.ttft_s is None and row.output_tokens == 0


def test_stream_without_done_is_a_failure():
    with ScriptedStreamServer() as server:
        _, row = _one(server, "truncated", output_tokens=3)
    assert row.error == "stream ended before data: [DONE]"


def test_unreachable_server_is_a_failed_row_not_an_exception():
    with ScriptedStreamServer() as server:
        url = server.url
    result = run_bench_sync(BenchConfig(url=url, model="plain", timeout_s=5),
                            [TraceRequest(0.0, 4, 2)])
    assert result.rows[0].error.startswith("Client")


def test_model_defaults_to_first_listed():
    with ScriptedStreamServer() as server:
        result, row = _one(server, None)
    assert result.model == "plain" and server.bodies[0]["model"] == "plain" and row.ok


# --- replay ------------------------------------------------------------------------------------

ARRIVALS = [0.0, 0.12, 0.04, 0.2, 0.08, 0.3]  # deliberately not sorted


def _trace(arrivals, output_tokens=3):
    return [TraceRequest(arrival_s=a, input_tokens=8 + i, output_tokens=output_tokens)
            for i, a in enumerate(arrivals)]


def test_open_loop_sends_at_scaled_arrivals_in_order():
    with ScriptedStreamServer() as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", time_scale=2.0),
                                _trace(ARRIVALS))
        sent_prompt_lengths = [len(b["prompt"]) for b in server.bodies]
    rows = result.rows
    assert [r.index for r in rows] == list(range(len(ARRIVALS)))
    assert [r.scheduled_s for r in rows] == pytest.approx([a / 2.0 for a in ARRIVALS])
    # open loop: no slot to wait for, so the lag is the time past the schedule, and small (sends never wait on answers)
    assert all(r.slot_wait_s == 0 and r.send_lag_s == pytest.approx(r.sent_s - r.scheduled_s, abs=1e-6) for r in rows)
    assert all(0 <= r.send_lag_s < 0.25 for r in rows), [r.send_lag_s for r in rows]
    by_send = sorted(rows, key=lambda r: r.sent_s)
    assert [r.index for r in by_send] == sorted(range(len(ARRIVALS)), key=lambda i: ARRIVALS[i])
    assert sorted(sent_prompt_lengths) == [8 + i for i in range(len(ARRIVALS))]
    assert result.summary.completed == len(ARRIVALS) and not result.stopped_early


def test_open_loop_does_not_wait_for_responses():
    with ScriptedStreamServer(hold_s=0.5) as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain"),
                                _trace([0.0, 0.01, 0.02]))
        most = server.max_in_flight
    assert most == 3  # each is held 0.5 s; all three were sent before any answer came
    assert result.summary.completed == 3


def test_clock_scale_compresses_arrivals_and_scales_durations():
    with ScriptedStreamServer() as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", time_scale=2.0,
                                            clock_scale=4.0), _trace(ARRIVALS))
    rows = result.rows
    assert [r.scheduled_s for r in rows] == pytest.approx([a / 8.0 for a in ARRIVALS])
    wall = max(r.finished_s for r in rows) - min(r.sent_s for r in rows)
    assert result.summary.duration_s == pytest.approx(wall * 4.0)
    assert all(r.e2e_s > 0 for r in rows)


def test_closed_loop_never_exceeds_its_concurrency():
    with ScriptedStreamServer(hold_s=0.05) as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", concurrency=3),
                                _trace([0.0] * 12))
        most = server.max_in_flight
    assert result.summary.completed == 12
    assert 2 <= most <= 3


def test_open_loop_cap_makes_requests_wait_for_a_slot():
    with ScriptedStreamServer(hold_s=0.05) as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", max_concurrency=2),
                                _trace([0.0] * 6))
        most = server.max_in_flight
    assert most <= 2
    assert result.summary.completed == 6
    assert sum(r.slot_wait_s > 0 for r in result.rows) >= 4  # only two can start at once


def test_progress_can_stop_the_replay_early():
    seen: list[ProgressSnapshot] = []

    async def stop_once_two_finished(snapshot: ProgressSnapshot) -> bool:
        seen.append(snapshot)
        return snapshot.completed == 2  # not at the first snapshot: a busy machine may not have answered yet

    arrivals = [0.0, 0.01] + [30.0 + i for i in range(8)]  # the last eight would take half a minute
    with ScriptedStreamServer() as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", progress_interval_s=0.2),
                                _trace(arrivals), on_progress=stop_once_two_finished)
    assert result.stopped_early
    assert seen[-1].completed == 2 and all(s.completed < 2 for s in seen[:-1]) and all(s.total == 10 for s in seen)
    assert len(result.rows) == 2 and result.not_finished == 8
    assert result.summary.completed == 2


def test_progress_snapshots_count_up_without_stopping():
    seen: list[ProgressSnapshot] = []
    with ScriptedStreamServer(hold_s=0.3) as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", progress_interval_s=0.1),
                                _trace([0.0, 0.0]), on_progress=lambda s: seen.append(s) and False)
    assert not result.stopped_early and result.summary.completed == 2
    assert seen and all(s.total == 2 for s in seen)
    assert [s.completed for s in seen] == sorted(s.completed for s in seen)


def test_a_failing_progress_callback_is_not_swallowed():
    def broken(snapshot: ProgressSnapshot) -> bool:
        raise ValueError("bug in the pruner")

    with ScriptedStreamServer() as server:
        with pytest.raises(ValueError, match="bug in the pruner"):
            run_bench_sync(BenchConfig(url=server.url, model="plain", progress_interval_s=0.1),
                           _trace([0.0, 20.0]), on_progress=broken)


def test_warmup_requests_are_sent_but_not_reported():
    with ScriptedStreamServer() as server:
        trace = [TraceRequest(0.0, 16, 2, prefix_blocks=(1,), block_tokens=16)]
        result = run_bench_sync(BenchConfig(url=server.url, model="plain", warmup_requests=2), trace)
        prompts = [b["prompt"] for b in server.bodies]
    assert len(prompts) == 3 and len(result.rows) == 1
    assert prompts[2] not in prompts[:2]  # the warm-up shares no prompt with the measured run


def test_goodput_through_a_real_replay():
    with ScriptedStreamServer() as server:
        result = run_bench_sync(BenchConfig(url=server.url, model="plain",
                                            slo=parse_slo("e2e_p99=60s")), _trace([0.0, 0.0]))
    assert result.summary.good_completed == 2 and result.summary.slo_met == {"e2e_p99": True}



def test_bench_command_end_to_end(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": i * 0.02, "input_tokens": 8,
                                         "output_tokens": 4}) + "\n" for i in range(6)))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with ScriptedStreamServer() as server:
        args = parser.parse_args(["--url", server.url, "--workload", str(trace), "--rows", "5",
                                  "--model", "chat-role", "--endpoint", "chat",
                                  "--slo", "e2e_p99=60s", "--out", str(tmp_path / "out")])
        code = run(args)
        served = len(server.bodies)
    out = capsys.readouterr().out
    assert code == 0 and served == 5
    assert "Successful requests:                    5" in out and "e2e_p99:" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["completed"] == 5 and summary["total_output_tokens"] == 20
    assert summary["endpoint"] == "chat" and summary["slo_met"] == {"e2e_p99": True}
    assert len((tmp_path / "out" / "requests.csv").read_text().splitlines()) == 6


def test_two_traces_replayed_with_one_seed_share_no_prompt():
    """A hold-out slice replayed after the study's slice on one server must not find its prompts in the
    prefix cache (H200 round 3: the same seed and position gave the same tokens, and 5x the goodput)."""
    study_slice = [TraceRequest(arrival_s=0.1 * i, input_tokens=900, output_tokens=200) for i in range(3)]
    holdout = [TraceRequest(arrival_s=3000.0 + 0.1 * i, input_tokens=900, output_tokens=200) for i in range(3)]
    for index, (a, b) in enumerate(zip(study_slice, holdout)):
        first, other = token_ids_for(a, index, 128256, 1), token_ids_for(b, index, 128256, 1)
        assert len(first) == len(other) == 900
        assert first[:16] != other[:16]  # not even vLLM's first 16-token block
        assert token_ids_for(a, index, 128256, 1) == first  # a replay is still reproducible
