"""The simulated engine behind a real OpenAI-compatible HTTP server (aiohttp), paced to wall-clock.

Each data-parallel replica runs its `SimScheduler` in one asyncio task: step in simulated time, then sleep
until wall = ready_time + simulated_time / time_scale (never accumulating drift; no sleep when
behind), then hand the step's tokens to the waiting response streams. When the process cannot keep
up, streams receive several steps' tokens in one chunk and `sim:clock_lag_seconds` says by how much.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
from aiohttp import web

from tuner import __version__
from tuner.simulator.config import EngineStartupError, SimConfig
from tuner.simulator.engine import EngineRequest, SimScheduler
from tuner.simulator.schedulers import make_engine
from tuner.simulator.support import check_engine

BANNER = "SIMULATED ENGINE (servetune performance model, not a GPU)"
OWNER = "servetune-simulator"
LOAD_SHARE = 0.5  # of --startup-seconds: weight loading; the rest is profiling and graph capture
SHUTDOWN_GRACE_S = 2.0  # open streams get this long after SIGTERM (a hung engine never ends them)
log = logging.getLogger("servetune.simulator")


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, error_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.param = status, error_type, param

    def response(self) -> web.Response:
        return error_response(str(self), self.status, self.error_type, self.param)


def error_response(message: str, status: int, error_type: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return web.json_response(body, status=status)


@dataclass(frozen=True)
class Generation:
    """A validated /v1/completions or /v1/chat/completions request."""

    prompt_ids: np.ndarray
    max_tokens: int
    ignore_eos: bool
    min_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    model: str


class TokenStream:
    """Where a replica loop leaves a request's progress for its HTTP handler."""

    __slots__ = ("event", "produced", "finished", "finish_reason", "error")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.produced = 0
        self.finished = False
        self.finish_reason = "length"
        self.error: str | None = None


class SimClock:
    def __init__(self, time_scale: float) -> None:
        self.time_scale = time_scale
        self.start = time.monotonic()

    def sim_now(self) -> float:
        return (time.monotonic() - self.start) * self.time_scale

    def wall_of(self, sim_time: float) -> float:
        return self.start + sim_time / self.time_scale


class Replica:
    """One data-parallel engine and the task that paces it."""

    def __init__(self, index: int, engine: SimScheduler, clock: SimClock) -> None:
        self.index = index
        self.engine = engine
        self.clock = clock
        self.wakeup = asyncio.Event()
        self.frozen = False  # hang fault
        self.lag = 0.0
        self.max_lag = 0.0
        self._warned_lag = False

    def submit(self, generation: Generation, request_id: str) -> tuple[EngineRequest, TokenStream]:
        engine = self.engine
        if not engine.has_unfinished():
            engine.advance_to(self.clock.sim_now())
        stream = TokenStream()
        request = engine.add_request(generation.prompt_ids, generation.max_tokens, ignore_eos=generation.ignore_eos,
                                     min_tokens=generation.min_tokens, request_id=request_id, user_data=stream)
        self.wakeup.set()
        return request, stream

    async def run(self) -> None:
        engine, clock = self.engine, self.clock
        while True:
            if self.frozen:
                await asyncio.Event().wait()
            if not engine.has_unfinished():
                self.wakeup.clear()
                await self.wakeup.wait()
                engine.advance_to(clock.sim_now())
                continue
            output = engine.step()
            delay = clock.wall_of(engine.now) - time.monotonic()
            if delay > 0:
                self.lag = 0.0
                await asyncio.sleep(delay)
            else:
                self._note_lag(-delay * clock.time_scale)
                await asyncio.sleep(0)
            if self.frozen:
                continue
            for request, _ in output.produced:
                stream = cast(TokenStream, request.user_data)
                stream.produced = request.num_output
                if request.finished:
                    stream.finished = True
                    stream.finish_reason = request.finish_reason
                stream.event.set()

    def _note_lag(self, lag: float) -> None:
        self.lag = lag
        self.max_lag = max(self.max_lag, lag)
        if lag > 1.0 and not self._warned_lag:
            self._warned_lag = True
            log.warning("Simulated clock lags wall-clock by %.2f simulated seconds: this process cannot keep up "
                        "at --time-scale %g; client-side timings are inflated (see sim:clock_lag_seconds).",
                        lag, self.clock.time_scale)


class SimServer:
    def __init__(self, config: SimConfig) -> None:
        self.config = config.resolved()
        self.served_names = self.config.served_model_name
        self.model_name = self.served_names[0]
        self.replicas: list[Replica] = []
        self.clock: SimClock | None = None
        self.dead = False
        self.requests_received = 0
        self.exit_code = 0
        self.stop_event: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []

    # ---- start-up -----------------------------------------------------------------------------

    def build_engines(self) -> None:
        """Raises `EngineStartupError` with vLLM's message when this configuration cannot run."""
        check_engine(self.config)
        engines = [make_engine(self.config, replica=index) for index in range(self.config.data_parallel_size)]
        self.clock = SimClock(self.config.time_scale)
        self.replicas = [Replica(index, engine, self.clock) for index, engine in enumerate(engines)]

    def log_memory(self) -> None:
        config, plan = self.config, self.replicas[0].engine.memory
        gib = 2**30
        log.info("Model loading took %.2f GiB memory (simulated, per GPU)", plan.weight_bytes / gib)
        log.info("Available KV cache memory: %.2f GiB", plan.kv_cache_bytes / gib)
        for replica in self.replicas:
            log.info("[DP%d] GPU KV cache size: %s tokens", replica.index, f"{replica.engine.memory.capacity_tokens:,}")
        max_model_len = config.limits.max_model_len
        log.info("Maximum concurrency for %s tokens per request: %.2fx", f"{max_model_len:,}",
                 plan.max_concurrency(max_model_len))

    def start_loops(self) -> None:
        assert self.clock is not None, "build_engines() first"
        self.clock.start = time.monotonic()
        self._tasks = [asyncio.get_running_loop().create_task(replica.run()) for replica in self.replicas]

    # ---- HTTP ---------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=256 * 2**20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/info", self.info)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """With a key, every route but /health needs it (unknown paths too: 401 says nothing of what exists)."""
        key = self.config.api_key
        if key and request.path != "/health" and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.dead else 200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": f"servetune-sim {__version__}", "simulated": True})

    async def info(self, request: web.Request) -> web.Response:
        config = asdict(self.config)
        config.pop("api_key")  # never handed out, even to a caller who has it
        plan = asdict(self.replicas[0].engine.memory)
        return web.json_response({"banner": BANNER, "config": config, "memory_plan": plan,
                                  "kv_cache_capacity_tokens": [r.engine.memory.capacity_tokens for r in self.replicas]})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        for replica in self.replicas:
            replica.engine.kv.reset_prefix_cache()
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": OWNER, "root": self.config.model_shape,
                 "parent": None, "max_model_len": self.config.max_model_len} for name in self.served_names]
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError("request body is not valid JSON") from None
            generation = self.parse_generation(body, chat)
        except RequestError as exc:
            return exc.response()
        if self.dead:
            return error_response("EngineCore encountered an issue.", 500, "InternalServerError")
        self.requests_received += 1
        self._maybe_inject_fault()
        if self.dead:
            return error_response("EngineCore encountered an issue.", 500, "InternalServerError")
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        replica = min(self.replicas, key=lambda r: r.engine.num_unfinished)
        engine_request, stream = replica.submit(generation, request_id)
        try:
            if generation.stream:
                return await self._stream(request, generation, engine_request, stream, chat)
            return await self._complete(generation, engine_request, stream, chat)
        finally:
            if not stream.finished:
                replica.engine.abort(request_id)

    def parse_generation(self, body: object, chat: bool) -> Generation:
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        model = body.get("model") or self.model_name
        if model not in self.served_names:
            raise RequestError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
        prompt_ids = parse_messages(body.get("messages")) if chat else parse_prompt(body.get("prompt"))
        prompt_len = len(prompt_ids)
        max_model_len = self.config.limits.max_model_len
        if prompt_len >= max_model_len:
            raise RequestError(f"This model's maximum context length is {max_model_len} tokens. However, your "
                               f"request has {prompt_len} input tokens. Please reduce the length of the input.",
                               param="prompt")
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = max_model_len - prompt_len if chat else 16
        max_tokens = _int_field(max_tokens, "max_tokens", minimum=1)
        if prompt_len + max_tokens > max_model_len:
            raise RequestError(f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is "
                               f"{max_model_len} tokens and your request has {prompt_len} input tokens "
                               f"({max_tokens} > {max_model_len} - {prompt_len}).", param="max_tokens")
        min_tokens = _int_field(body.get("min_tokens", 0), "min_tokens", minimum=0)
        if min_tokens > max_tokens:
            raise RequestError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
                               param="min_tokens")
        if _int_field(body.get("n", 1), "n", minimum=1) != 1:
            raise RequestError("the simulated engine serves n=1 only", param="n")
        stream = _bool_field(body.get("stream", False), "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise RequestError("Stream options can only be defined when `stream=True`.", param="stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        options = options or {}
        return Generation(prompt_ids, max_tokens, _bool_field(body.get("ignore_eos", False), "ignore_eos"), min_tokens,
                          stream, _bool_field(options.get("include_usage", False), "stream_options.include_usage"),
                          _bool_field(options.get("continuous_usage_stats", False),
                                      "stream_options.continuous_usage_stats"), model)

    async def _stream(self, request: web.Request, generation: Generation, engine_request: EngineRequest,
                      stream: TokenStream, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())
        prompt_tokens = engine_request.prompt_len
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = (f'data: {{"id":"{engine_request.request_id}","object":"{kind}","created":{created},'
                f'"model":{json.dumps(generation.model)},"choices":[')
        words = TokenWords(engine_request.request_id)
        if chat:
            await response.write(f'{head}{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                                 f'"finish_reason":null}}]}}\n\n'.encode())
        sent = 0
        while True:
            await stream.event.wait()
            stream.event.clear()
            if stream.error:
                error = {"error": {"message": stream.error, "type": "InternalServerError", "param": None, "code": 500}}
                await response.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                return response
            produced = stream.produced
            if produced > sent:
                text = words.text(sent, produced)
                finish = f'"{stream.finish_reason}"' if stream.finished else "null"
                if chat:
                    choice = f'{{"index":0,"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":{finish}}}'
                else:
                    choice = (f'{{"index":0,"text":"{text}","logprobs":null,"finish_reason":{finish},'
                              f'"stop_reason":null}}')
                usage = ""
                if generation.continuous_usage:
                    usage = f',"usage":{json.dumps(_usage(prompt_tokens, produced), separators=(",", ":"))}'
                await response.write(f"{head}{choice}]{usage}}}\n\n".encode())
                sent = produced
            if stream.finished:
                break
        tail = ""
        if generation.include_usage:
            tail = f'{head}],"usage":{json.dumps(_usage(prompt_tokens, sent), separators=(",", ":"))}}}\n\n'
        await response.write(f"{tail}data: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    async def _complete(self, generation: Generation, engine_request: EngineRequest, stream: TokenStream,
                        chat: bool) -> web.Response:
        while not stream.finished and not stream.error:
            await stream.event.wait()
            stream.event.clear()
        if stream.error:
            return error_response(stream.error, 500, "InternalServerError")
        text = TokenWords(engine_request.request_id).text(0, stream.produced)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": stream.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason,
                      "stop_reason": None}
        return web.json_response({"id": engine_request.request_id,
                                  "object": "chat.completion" if chat else "text_completion",
                                  "created": int(time.time()), "model": generation.model, "choices": [choice],
                                  "usage": _usage(engine_request.prompt_len, stream.produced)})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")

    def metrics_text(self) -> str:
        model = self.model_name.replace("\\", "\\\\").replace('"', '\\"')
        note = " (simulated engine, not a GPU)"
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, values: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}{note}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{{{labels}}} {value}" for labels, value in values)

        def per_engine(value_of) -> list[tuple[str, float]]:
            return [(f'model_name="{model}",engine="{r.index}"', float(value_of(r))) for r in self.replicas]

        family("sim:num_requests_running", "gauge", "Number of requests in model execution batches.",
               per_engine(lambda r: len(r.engine.running)))
        family("sim:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               per_engine(lambda r: r.engine.num_waiting))
        family("sim:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               per_engine(lambda r: r.engine.kv.usage))
        family("sim:kv_cache_capacity_tokens", "gauge", "KV-cache capacity in tokens.",
               per_engine(lambda r: r.engine.memory.capacity_tokens))
        counters = [
            ("sim:num_preemptions_total", "Cumulative number of preemptions.", "num_preemptions"),
            ("sim:prefix_cache_queries_total", "Prefix cache queries, in tokens.", "prefix_queries"),
            ("sim:prefix_cache_hits_total", "Prefix cache hits, in tokens.", "prefix_hits"),
            ("sim:prompt_tokens_total", "Number of prefill tokens processed.", "prompt_tokens"),
            ("sim:generation_tokens_total", "Number of generation tokens processed.", "generation_tokens"),
            ("sim:spec_decode_num_draft_tokens_total", "Number of draft tokens.", "draft_tokens"),
            ("sim:spec_decode_num_accepted_tokens_total", "Number of accepted tokens.", "accepted_tokens"),
            ("sim:engine_steps_total", "Number of engine steps (batches) executed.", "steps"),
            ("sim:engine_busy_seconds_total", "Simulated seconds the engine spent executing steps.", "busy_seconds"),
            ("sim:request_success_total", "Count of successfully finished requests.", "finished_requests"),
        ]
        for name, help_text, attribute in counters:
            family(name, "counter", help_text, per_engine(lambda r, a=attribute: getattr(r.engine.stats, a)))
        sim_now = self.clock.sim_now() if self.clock else 0.0
        family("sim:simulated_seconds_total", "counter", "Simulated seconds since the server became ready.",
               [(f'model_name="{model}"', sim_now)])
        family("sim:time_scale", "gauge", "Simulated seconds per wall-clock second (--time-scale).",
               [(f'model_name="{model}"', self.config.time_scale)])
        family("sim:clock_lag_seconds", "gauge",
               "How far the simulated clock lags wall-clock x time-scale, in simulated seconds.",
               per_engine(lambda r: r.lag))
        family("sim:clock_lag_max_seconds", "gauge", "Largest simulated-clock lag seen, in simulated seconds.",
               per_engine(lambda r: r.max_lag))
        return "\n".join(lines) + "\n"

    # ---- faults -------------------------------------------------------------------------------

    def _maybe_inject_fault(self) -> None:
        fault = self.config.fault
        if fault in ("none", "crash-at-start") or self.requests_received < self.config.fault_after_requests:
            return
        if fault == "oom-under-load":
            log.error("EngineCore encountered a fatal error.")
            log.error("torch.OutOfMemoryError: CUDA out of memory under load (simulated fault). Tried to allocate "
                      "2.00 GiB. GPU 0 has a total capacity of %.2f GiB of which 0 bytes is free.",
                      self.config.gpu_spec.memory_gib)
            _hard_exit(1)
        elif fault == "crash-under-load" and not self.dead:
            self.dead = True
            log.error("EngineCore encountered a fatal error (simulated fault: crash under load).")
            log.error("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
                      "See stack trace (above) for the root cause.")
            for replica in self.replicas:
                replica.frozen = True
                for engine_request in list(replica.engine.running) + list(replica.engine.waiting):
                    stream = cast(TokenStream, engine_request.user_data)
                    stream.error = "EngineCore encountered an issue. See stack trace (above) for the root cause."
                    stream.event.set()
            self.exit_code = 1
            assert self.stop_event is not None  # set by _serve before any request
            asyncio.get_running_loop().call_later(0.5, self.stop_event.set)
        elif fault == "hang-under-load" and not self.replicas[0].frozen:
            log.warning("simulated fault: engine hang under load (steps stop, /health stays 200)")
            for replica in self.replicas:
                replica.frozen = True


class TokenWords:
    """The simulator's output text: one word `w<id> ` per token, ids fixed per request."""

    __slots__ = ("base",)

    def __init__(self, request_id: str) -> None:
        self.base = hash(request_id) & 0xFFFF

    def text(self, start: int, end: int) -> str:
        base = self.base
        return "".join(f"w{(base + 7919 * i) % 32000 + 100} " for i in range(start, end))


def parse_prompt(prompt: object) -> np.ndarray:
    """Token ids, or text counted as one token per whitespace-separated word."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _words_to_ids(prompt, "prompt")
    if isinstance(prompt, list) and prompt:
        if not all(type(token) is int for token in prompt):
            raise RequestError("prompt must be a string or a list of integer token ids", param="prompt")
        ids = np.asarray(prompt, dtype=np.int64)
        if ids.min() < 0:
            raise RequestError(f"Token id {int(ids.min())} is out of vocabulary", param="prompt")
        return ids
    if isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError("the simulated engine serves one prompt per request", param="prompt")
    raise RequestError("prompt must be a non-empty string or list of token ids", param="prompt")


def parse_messages(messages: object) -> np.ndarray:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError("each message must be an object with a role", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
        elif content is not None:
            raise RequestError("message content must be a string or a list of parts", param="messages")
    return _words_to_ids(" ".join(texts), "messages")


def _words_to_ids(text: str, param: str) -> np.ndarray:
    words = text.split()
    if not words:
        raise RequestError("The prompt cannot be empty.", param=param)
    return np.fromiter(map(hash, words), dtype=np.int64, count=len(words))


def _int_field(value: object, name: str, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise RequestError(f"{name} must be an integer >= {minimum}, got {value!r}", param=name)
    return value


def _bool_field(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def _hard_exit(code: int) -> None:
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _setup_logging() -> None:
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [sim-serve] %(message)s", "%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _log_startup_failure(message: str) -> None:
    log.error("EngineCore failed to start.")
    for line in message.splitlines():
        log.error("%s", line)
    log.error("RuntimeError: Engine core initialization failed. See root cause above. "
              "Failed core proc(s): {'EngineCore_DP0': 1}")


async def _serve(server: SimServer) -> int:
    config = server.config
    loop = asyncio.get_running_loop()
    server.stop_event = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.stop_event.set)
    scale = config.time_scale
    log.warning("%s", BANNER)
    log.info("servetune simulator %s: model shape %s on %d x %s (TP=%d PP=%d DP=%d), time scale %gx", __version__,
             config.model_shape, config.tensor_parallel_size * config.pipeline_parallel_size
             * config.data_parallel_size, config.gpu, config.tensor_parallel_size, config.pipeline_parallel_size,
             config.data_parallel_size, scale)
    log.info("Simulated engine config: max_num_seqs=%d, max_num_batched_tokens=%d, max_model_len=%d, "
             "gpu_memory_utilization=%g, enable_prefix_caching=%s, enable_chunked_prefill=%s, enforce_eager=%s, "
             "async_scheduling=%s, kv_cache_dtype=%s, quantization=%s, speculative=%s, attention_backend=%s",
             config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len, config.gpu_memory_utilization,
             config.enable_prefix_caching, config.enable_chunked_prefill, config.enforce_eager,
             config.async_scheduling, config.kv_cache_dtype, config.quantization,
             asdict(config.speculative) if config.speculative else None, config.attention_backend)
    try:
        check_engine(config)
    except EngineStartupError as exc:
        _log_startup_failure(str(exc))
        return 1
    load_wall = config.startup_seconds * LOAD_SHARE / scale
    log.info("Loading simulated weights (%.1f simulated s) ...", config.startup_seconds * LOAD_SHARE)
    if await _sleep_or_stop(server, load_wall):
        return 0
    if config.fault == "crash-at-start":
        _log_startup_failure("RuntimeError: simulated fault: crash at start")
        return 1
    try:
        server.build_engines()
    except EngineStartupError as exc:
        _log_startup_failure(str(exc))
        return 1
    server.log_memory()
    warmup_share = (1 - LOAD_SHARE) * (0.3 if config.enforce_eager else 1.0)
    if await _sleep_or_stop(server, config.startup_seconds * warmup_share / scale):
        return 0
    if not config.enforce_eager:
        log.info("Graph capturing finished in %.0f secs (simulated), took %.2f GiB", config.startup_seconds
                 * warmup_share, server.replicas[0].engine.memory.cuda_graph_bytes / 2**30)

    runner = web.AppRunner(server.build_app(), handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        log.error("OSError: [Errno %s] could not bind %s:%d: %s", exc.errno, config.host, config.port, exc.strerror)
        await runner.cleanup()
        return 1
    server.start_loops()
    log.info("Starting simulated vLLM-compatible API server on http://%s:%d", config.host, config.port)
    log.info("Application startup complete.")
    await server.stop_event.wait()
    log.info("Shutting down")
    for task in server._tasks:
        task.cancel()
    await runner.shutdown()
    await runner.cleanup()
    return server.exit_code


async def _sleep_or_stop(server: SimServer, seconds: float) -> bool:
    """Sleep, unless a stop signal comes first (then True)."""
    assert server.stop_event is not None
    try:
        await asyncio.wait_for(server.stop_event.wait(), timeout=max(seconds, 0.0))
        return True
    except asyncio.TimeoutError:
        return False


def serve(config: SimConfig) -> int:
    """Run `tune sim-serve` until SIGINT/SIGTERM; the exit code (1 on a start-up failure)."""
    _setup_logging()
    return asyncio.run(_serve(SimServer(config)))
