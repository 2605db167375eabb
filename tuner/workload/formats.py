"""Streaming trace readers: Mooncake JSONL, Azure CSV and our native JSONL, one `TraceRequest` a line.

Files are read line by line, so a trace of millions of rows never sits in memory. Every problem is an
`InputError` naming the file, the 1-based line number and the field.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

from tuner.errors import InputError
from tuner.workload.request import TraceRequest

FORMATS = ("mooncake", "azure", "native")
MOONCAKE_BLOCK_TOKENS = 512
DEFAULT_BLOCK_TOKENS = 512
TOKENS_PER_WORD = 1.3  # estimate of input_tokens when a native line gives only text
MAX_LINE_BYTES = 64 * 2**20  # one request's line, its prompt text included
MAX_TOKENS = 10**9  # no prompt or answer is longer; larger counts are typos (and overflow int64 sums)
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
NATIVE_FIELDS = frozenset({"arrival_s", "input_tokens", "output_tokens", "prompt", "messages",
                           "prefix_blocks", "block_tokens", "session_id"})

_AZURE_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?")
_UTF8_BOM = b"\xef\xbb\xbf"


def detect_format(path: str | Path) -> str:
    """'mooncake', 'azure' or 'native', judged from the first non-empty line."""
    for line_number, text in _lines(path):
        if text.startswith("{"):
            row = _parse_json(text, path, line_number)
            if "timestamp" in row:
                return "mooncake"
            if "arrival_s" in row:
                return "native"
            raise InputError("cannot tell the trace format: a JSON line needs 'timestamp' (Mooncake) "
                             "or 'arrival_s' (native)", file=str(path), line=line_number)
        if "TIMESTAMP" in text.split(",")[0].upper():
            return "azure"
        raise InputError("cannot tell the trace format: expected a JSON object (Mooncake or native "
                         "JSONL) or an Azure CSV header 'TIMESTAMP,ContextTokens,GeneratedTokens'",
                         file=str(path), line=line_number)
    raise InputError("the trace file is empty", file=str(path))


def read_trace(path: str | Path, fmt: str | None = None) -> Iterator[TraceRequest]:
    """Requests of the trace at `path`, streamed. `fmt` None means detect it.

    The format and the file's existence are checked now; line errors come while iterating.
    """
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"unknown trace format '{fmt}' (expected one of: {', '.join(FORMATS)})",
                         field="format")
    _check_readable(path)
    fmt = fmt or detect_format(path)
    reader = {"mooncake": _read_mooncake, "azure": _read_azure, "native": _read_native}[fmt]
    return _non_empty(reader(path), path)


def _check_readable(path: str | Path) -> None:
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", file=str(path))
    if not p.is_file():
        raise InputError("not a regular file", file=str(path))


def _non_empty(requests: Iterator[TraceRequest], path: str | Path) -> Iterator[TraceRequest]:
    count = 0
    for request in requests:
        count += 1
        yield request
    if count == 0:
        raise InputError("the trace holds no requests", file=str(path))


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without line ending) of each non-blank line."""
    _check_readable(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=str(path)) from None
    with f:
        for line_number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:  # read no further than the cap: a file with no newline is one line
                raise InputError(f"line longer than {MAX_LINE_BYTES:,} bytes (is this a trace?)", file=str(path),
                                 line=line_number)
            if line_number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM):]
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError("not UTF-8 text", file=str(path), line=line_number) from None
            if text:
                yield line_number, text


def _parse_json(text: str, path: str | Path, line_number: int) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at column {exc.colno})", file=str(path),
                         line=line_number) from None
    except RecursionError:  # [[[[... thousands deep
        raise InputError("not usable JSON (nested too deep)", file=str(path), line=line_number) from None
    except ValueError as exc:  # an integer of thousands of digits
        raise InputError(f"not usable JSON ({str(exc).split(';')[0]})", file=str(path), line=line_number) from None
    if not isinstance(row, dict):
        raise InputError("expected a JSON object", file=str(path), line=line_number)
    return row


def _shown(value: object, width: int = 40) -> str:
    """A value as JSON, cut short when long."""
    text = json.dumps(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text):,} characters)"


class _Line:
    """Field access for one line, raising errors that name the file, line and field."""

    def __init__(self, path: str | Path, line_number: int, row: dict) -> None:
        self.path, self.line_number, self.row = str(path), line_number, row

    def error(self, field: str | None, message: str) -> InputError:
        return InputError(message, file=self.path, line=self.line_number, field=field)

    def require(self, field: str) -> object:
        if field not in self.row:
            raise self.error(field, "missing")
        return self.row[field]

    def count(self, field: str, value: object | None = None) -> int:
        value = self.require(field) if value is None else value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"must be a non-negative integer, got {_shown(value)}")
        if not 0 <= value <= MAX_TOKENS:
            raise self.error(field, f"must be a non-negative integer up to {MAX_TOKENS:,}, got {_shown(value)}")
        return value

    def time(self, field: str, value: object) -> float:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**1000:
            raise self.error(field, f"must be a number of seconds or ms, got {_shown(value)}")  # beyond a float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(field, f"must be a number, got {json.dumps(value)}")
        if value < 0:
            raise self.error(field, f"must not be negative, got {value}")
        return float(value)

    def block_ids(self, field: str, input_tokens: int, block_tokens: int) -> tuple[int, ...]:
        value = self.row.get(field, [])
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int)
                                              for v in value):
            raise self.error(field, "must be a list of integer block ids")
        most = -(-input_tokens // block_tokens)
        if len(value) > most:
            raise self.error(field, f"{len(value)} blocks, but {input_tokens} input tokens fill at "
                                    f"most {most} blocks of {block_tokens} tokens")
        return tuple(value)


class _Arrivals:
    """Checks that arrival times never go backwards."""

    def __init__(self) -> None:
        self.previous = -math.inf
        self.previous_shown: object = None

    def check(self, line: _Line, field: str, arrival: float, shown: object) -> None:
        if arrival < self.previous:
            raise line.error(field, f"time goes backwards: {shown} after {self.previous_shown} "
                                    "(requests must be in arrival order)")
        self.previous, self.previous_shown = arrival, shown


def _read_mooncake(path: str | Path) -> Iterator[TraceRequest]:
    arrivals = _Arrivals()
    for line_number, text in _lines(path):
        line = _Line(path, line_number, _parse_json(text, path, line_number))
        timestamp_ms = line.time("timestamp", line.require("timestamp"))
        arrivals.check(line, "timestamp", timestamp_ms, line.row["timestamp"])
        input_tokens = line.count("input_length")
        output_tokens = line.count("output_length")
        blocks = line.block_ids("hash_ids", input_tokens, MOONCAKE_BLOCK_TOKENS)
        yield TraceRequest(arrival_s=timestamp_ms / 1000.0, input_tokens=input_tokens,
                           output_tokens=output_tokens, prefix_blocks=blocks,
                           block_tokens=MOONCAKE_BLOCK_TOKENS)


def _read_native(path: str | Path) -> Iterator[TraceRequest]:
    arrivals = _Arrivals()
    for line_number, text in _lines(path):
        line = _Line(path, line_number, _parse_json(text, path, line_number))
        unknown = sorted(set(line.row) - NATIVE_FIELDS)
        if unknown:
            raise line.error(unknown[0], "unknown field (see the native JSONL format in the README)")
        arrival = line.time("arrival_s", line.require("arrival_s"))
        arrivals.check(line, "arrival_s", arrival, line.row["arrival_s"])
        prompt = _native_prompt(line)
        messages = _native_messages(line)
        if "input_tokens" in line.row or (prompt is None and messages is None):
            input_tokens = line.count("input_tokens")
        else:
            input_tokens = estimate_tokens(prompt, messages)
        output_tokens = line.count("output_tokens")
        block_tokens = DEFAULT_BLOCK_TOKENS
        if "block_tokens" in line.row:
            block_tokens = line.count("block_tokens")
            if block_tokens == 0:
                raise line.error("block_tokens", "must be positive")
        session_id = line.row.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            raise line.error("session_id", f"must be a string, got {json.dumps(session_id)}")
        yield TraceRequest(arrival_s=arrival, input_tokens=input_tokens, output_tokens=output_tokens,
                           prefix_blocks=line.block_ids("prefix_blocks", input_tokens, block_tokens),
                           block_tokens=block_tokens, session_id=session_id, prompt=prompt,
                           messages=messages)


def _native_prompt(line: _Line) -> str | None:
    prompt = line.row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise line.error("prompt", "must be a string")
    return prompt


def _native_messages(line: _Line) -> tuple[dict, ...] | None:
    messages = line.row.get("messages")
    if messages is None:
        return None
    if not isinstance(messages, list) or not messages:
        raise line.error("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise line.error(f"messages[{i}]", "must be an object with string 'role' and 'content'")
    return tuple(messages)


def estimate_tokens(prompt: str | None, messages: tuple[dict, ...] | None) -> int:
    """Rough token count of text: whitespace-separated words x 1.3, rounded half up."""
    words = len(prompt.split()) if prompt is not None else 0
    for message in messages or ():
        words += len(message["content"].split())
    return math.floor(words * TOKENS_PER_WORD + 0.5)


def _read_azure(path: str | Path) -> Iterator[TraceRequest]:
    arrivals = _Arrivals()
    columns: dict[str, int] | None = None
    width = 0
    first_time: tuple[int, float] | None = None
    for line_number, text in _lines(path):
        try:
            fields = next(csv.reader([text], strict=True))
        except csv.Error as exc:
            raise InputError(f"not valid CSV ({exc})", file=str(path), line=line_number) from None
        if columns is None:
            columns, width = _azure_columns(fields, path, line_number), len(fields)
            continue
        line = _Line(path, line_number, {})
        if len(fields) != width:
            raise line.error(None, f"expected {width} comma-separated fields like the header, "
                                   f"got {len(fields)}")
        line.row = {name: fields[index] for name, index in columns.items()}
        whole, fraction = _azure_time(line)
        if first_time is None:
            first_time = (whole, fraction)
        arrival = round((whole - first_time[0]) + (fraction - first_time[1]), 9)
        arrivals.check(line, "TIMESTAMP", arrival, line.row["TIMESTAMP"])
        yield TraceRequest(arrival_s=arrival,
                           input_tokens=line.count("ContextTokens", _csv_int(line, "ContextTokens")),
                           output_tokens=line.count("GeneratedTokens",
                                                    _csv_int(line, "GeneratedTokens")),
                           prefix_blocks=(), block_tokens=DEFAULT_BLOCK_TOKENS)


def _azure_columns(header: list[str], path: str | Path, line_number: int) -> dict[str, int]:
    names = [name.strip() for name in header]
    missing = [name for name in AZURE_COLUMNS if name not in names]
    if missing:
        raise InputError(f"Azure CSV header lacks column '{missing[0]}' (expected "
                         f"{','.join(AZURE_COLUMNS)})", file=str(path), line=line_number,
                         field=missing[0])
    return {name: names.index(name) for name in AZURE_COLUMNS}


def _csv_int(line: _Line, field: str) -> object:
    text = line.row[field].strip()
    digits = text[1:] if text.startswith("-") else text
    if digits.isascii() and digits.isdigit() and len(digits) <= 30:  # longer ones: `count` rejects the text
        return int(text)
    return text  # `count` rejects it, quoting the text


def _azure_time(line: _Line) -> tuple[int, float]:
    """(whole seconds since the epoch, fraction of a second) of the TIMESTAMP field."""
    text = line.row["TIMESTAMP"].strip()
    match = _AZURE_TIME.fullmatch(text)
    if match is None:
        raise line.error("TIMESTAMP", f"expected a time like '2023-11-16 18:15:46.6805900', "
                                      f"got '{text}'")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        day_start = _day_start_epoch(year, month, day)
        if int(hour) > 23 or int(minute) > 59 or int(second) > 60:
            raise ValueError("time of day out of range")
    except ValueError:
        raise line.error("TIMESTAMP", f"not a valid date and time: '{text}'") from None
    whole = day_start + int(hour) * 3600 + int(minute) * 60 + int(second) - _zone_offset_s(zone)
    return whole, float(f"0.{fraction[:9]}") if fraction else 0.0  # any digits; nanoseconds kept


@functools.lru_cache(maxsize=64)
def _day_start_epoch(year: str, month: str, day: str) -> int:
    return int(dt.datetime(int(year), int(month), int(day), tzinfo=dt.timezone.utc).timestamp())


def _zone_offset_s(zone: str | None) -> int:
    if zone is None or zone == "Z":
        return 0  # times without a zone are taken as UTC
    digits = zone[1:].replace(":", "")
    offset = int(digits[:2]) * 3600 + int(digits[2:]) * 60
    return offset if zone[0] == "+" else -offset
