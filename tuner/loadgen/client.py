"""One streaming request to an OpenAI-compatible server, timed chunk by chunk.

`SseDecoder` turns bytes (split anywhere by TCP) into `data:` payloads; `StreamAccumulator` turns
payloads with their arrival times into TTFT, inter-chunk gaps and token counts; `stream_request` does
the HTTP. Times are `time.perf_counter()` seconds, wall-clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from tuner.errors import InputError
from tuner.workload.prompts import text_for, token_ids_for
from tuner.workload.request import TraceRequest

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def build_payload(endpoint: str, model: str, request: TraceRequest, index: int, vocab_size: int,
                  seed: int) -> dict:
    """Request body forcing exactly `output_tokens` tokens (at least 1) of greedy output."""
    output_tokens = max(1, request.output_tokens)
    body: dict = {"model": model}
    if endpoint == "chat":
        if request.messages:
            body["messages"] = [dict(message) for message in request.messages]
        else:
            body["messages"] = [{"role": "user", "content": text_for(request, index, seed)}]
    elif request.prompt is not None:
        body["prompt"] = request.prompt
    else:
        body["prompt"] = token_ids_for(request, index, vocab_size, seed)
    body.update(
        max_tokens=output_tokens,
        min_tokens=output_tokens,
        ignore_eos=True,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    return body


def encode_body(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class SseDecoder:
    """Server-sent events: buffer across reads, split on blank lines, skip `:` comments."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        payloads: list[str] = []
        while True:
            event, sep, rest = self._buffer.partition(b"\n\n")
            if not sep:
                return payloads
            self._buffer = rest
            payload = self._data_of(event)
            if payload is not None:
                payloads.append(payload)

    def close(self) -> list[str]:
        """An event left unterminated when the stream ended."""
        event, self._buffer = self._buffer, b""
        payload = self._data_of(event.strip(b"\n"))
        return [] if payload is None else [payload]

    @staticmethod
    def _data_of(event: bytes) -> str | None:
        lines = []
        for line in event.decode("utf-8", errors="replace").split("\n"):
            if line.startswith("data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(" ") else value)
        return "\n".join(lines) if lines else None


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


@dataclass(slots=True)
class StreamAccumulator:
    """Timing and token counts of one stream, fed with payloads and the time they arrived."""

    chat: bool
    sent_at: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    last_byte_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    content_chunks: int = 0
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    cached_tokens: int | None = None
    done: bool = False
    error: str | None = None

    def feed(self, payloads: list[str], now: float) -> None:
        self.last_byte_at = now
        for payload in payloads:
            if self.done or self.error is not None:
                return
            self._event(payload, now)

    def _event(self, payload: str, now: float) -> None:
        if payload.strip() == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self.error = f"unparseable stream event: {payload[:120]!r}"
            return
        if not isinstance(event, dict):
            self.error = f"unexpected stream event: {payload[:120]!r}"
            return
        if event.get("error"):
            self.error = f"server error mid-stream: {_error_message(event['error'])}"
            return
        if event.get("object") == "error":
            self.error = f"server error mid-stream: {event.get('message') or payload[:120]}"
            return
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        choices = event.get("choices")
        if choices and isinstance(choices[0], dict) and self._carries_token(choices[0]):
            self.content_chunks += 1
            if self.first_token_at is None:
                self.first_token_at = now
            elif self.last_token_at is not None:  # always, once the first token came
                self.gaps.append(now - self.last_token_at)
            self.last_token_at = now

    def _carries_token(self, choice: dict) -> bool:
        if self.chat:  # the first chat chunk usually carries only the role: not a token
            delta = choice.get("delta") or {}
            return bool(delta.get("content") or delta.get("reasoning_content")
                        or delta.get("reasoning") or delta.get("tool_calls"))
        text = choice.get("text")
        # an empty text with no finish_reason is a token whose bytes the detokenizer holds back
        return bool(text) or (text == "" and choice.get("finish_reason") is None)

    def _usage(self, usage: dict) -> None:
        if isinstance(usage.get("completion_tokens"), int):
            self.usage_completion_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            self.usage_prompt_tokens = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached_tokens = details["cached_tokens"]

    def finish(self) -> None:
        """Called when the stream ended: a stream that stopped short is an error."""
        if self.error is None and not self.done:
            self.error = "stream ended before data: [DONE]"
        if self.error is None and self.first_token_at is None:
            self.error = "stream carried no generated text"

    @property
    def output_tokens(self) -> int:
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.content_chunks


@dataclass(slots=True)
class StreamOutcome:
    sent_at: float  # perf_counter when the request was handed to the HTTP client
    finished_at: float  # last byte, or when the failure was seen
    ttft_s: float | None
    itl_s: list[float]
    e2e_s: float | None
    output_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    error: str | None


async def stream_request(session: aiohttp.ClientSession, url: str, body: bytes, *, chat: bool,
                         headers: dict[str, str], timeout_s: float) -> StreamOutcome:
    """POST one streaming request and time it; never raises for server or network failures."""
    acc = StreamAccumulator(chat=chat, sent_at=time.perf_counter())
    try:
        async with session.post(url, data=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                text = await response.text(errors="replace")
                acc.error = f"HTTP {response.status}: {_http_error_text(text)}"
            else:
                decoder = SseDecoder()
                async for data in response.content.iter_any():
                    acc.feed(decoder.feed(data), time.perf_counter())
                    if acc.done or acc.error is not None:
                        break
                else:
                    acc.feed(decoder.close(), acc.last_byte_at or time.perf_counter())
                acc.finish()
    except asyncio.TimeoutError:
        acc.error = f"timed out after {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        acc.error = f"{type(exc).__name__}: {exc}"
    finished_at = time.perf_counter()
    if acc.error is None and acc.last_byte_at is not None:
        finished_at = acc.last_byte_at
    return StreamOutcome(
        sent_at=acc.sent_at,
        finished_at=finished_at,
        ttft_s=None if acc.first_token_at is None else acc.first_token_at - acc.sent_at,
        itl_s=acc.gaps,
        e2e_s=None if acc.error is not None else finished_at - acc.sent_at,
        output_tokens=acc.output_tokens,
        prompt_tokens=acc.usage_prompt_tokens,
        cached_tokens=acc.cached_tokens,
        error=acc.error,
    )


def _http_error_text(text: str) -> str:
    try:
        document = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:200] or "(empty body)"
    if isinstance(document, dict):
        if "error" in document:
            return _error_message(document["error"])[:200]
        if "message" in document:
            return str(document["message"])[:200]
    return text[:200]


def request_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def fetch_first_model(session: aiohttp.ClientSession, base_url: str,
                            headers: dict[str, str]) -> str:
    """The first model id from GET /v1/models."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=30)) as response:
            if response.status != 200:
                raise InputError(f"GET {url} returned HTTP {response.status}", field="url")
            document = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise InputError(f"cannot list models at {url}: {type(exc).__name__}: {exc}",
                         field="url") from None
    models = document.get("data") if isinstance(document, dict) else None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise InputError(f"GET {url} listed no models; pass --model", field="url")
    return str(models[0]["id"])
