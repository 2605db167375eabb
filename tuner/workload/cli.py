"""`tune workload inspect|slice`: summarise a trace, or cut a smaller replayable trace from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tuner.errors import InputError
from tuner.workload.analysis import analyze, format_stats
from tuner.workload.formats import FORMATS, detect_format, read_trace
from tuner.workload.request import TraceRequest
from tuner.workload.transform import selected, trace_digest


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
    return value


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="trace file (Mooncake JSONL, Azure CSV or native JSONL)")
    parser.add_argument("--format", dest="trace_format", metavar="F", default=None,
                        help=f"trace format: {', '.join(FORMATS)} (default: detect)")
    parser.add_argument("--rows", type=_positive_int, metavar="N", help="keep the first N requests")
    parser.add_argument("--seconds", type=_positive_float, metavar="T",
                        help="keep requests arriving in the first T seconds of trace time")
    parser.add_argument("--time-scale", type=_positive_float, default=1.0, metavar="K",
                        help="replay K times faster (arrival times divided by K; default 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="workload_action", metavar="{inspect,slice}", required=True)
    inspect = actions.add_parser("inspect", help="print rate, burstiness, token lengths, prefix reuse",
                                 description="Summarise a trace: rate, burstiness, token lengths, "
                                             "prefix reuse.")
    _add_selection(inspect)
    inspect.add_argument("--max-concurrency", type=_positive_int, metavar="C",
                         help="replay cap on requests in flight (recorded and printed only)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    cut = actions.add_parser("slice", help="write a smaller trace (native JSONL)",
                             description="Write the selected requests as native JSONL (or Mooncake "
                                         "JSONL with --keep-format).")
    _add_selection(cut)
    cut.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write")
    cut.add_argument("--keep-format", action="store_true",
                     help="write Mooncake JSONL when the input is Mooncake")


def run(args: argparse.Namespace) -> int:
    if args.workload_action == "inspect":
        return _inspect(args)
    return _slice(args)


def _selection(args: argparse.Namespace) -> tuple[str, Iterable[TraceRequest]]:
    fmt = args.trace_format or detect_format(args.file)
    return fmt, selected(read_trace(args.file, fmt), rows=args.rows, seconds=args.seconds, time_scale=args.time_scale)


def _inspect(args: argparse.Namespace) -> int:
    fmt, requests = _selection(args)
    stats = analyze(requests)
    selection = {"rows": args.rows, "seconds": args.seconds, "time_scale": args.time_scale,
                 "max_concurrency": args.max_concurrency}
    if args.json:
        print(json.dumps({"file": str(args.file), "format": fmt, "sha256": trace_digest(args.file),
                          "selection": selection, "stats": dataclasses.asdict(stats)}))
        return 0
    chosen = [f"first {args.rows:,} requests"] if args.rows else []
    chosen += [f"first {args.seconds:g} s"] if args.seconds else []
    chosen += [f"{args.time_scale:g}x faster"] if args.time_scale != 1.0 else []
    print(f"trace      {args.file} ({fmt}, sha256 {trace_digest(args.file)[:12]})")
    print(f"selection  {', '.join(chosen) or 'whole trace'}")
    if args.max_concurrency is not None:
        print(f"replay cap at most {args.max_concurrency} requests in flight")
    print()
    print(format_stats(stats))
    return 0


def _slice(args: argparse.Namespace) -> int:
    source, target = Path(args.file), Path(args.output)
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise InputError("the output would overwrite the input trace", field="--output")
    fmt, requests = _selection(args)
    if args.keep_format and fmt == "azure":
        raise InputError("only Mooncake (or native) traces can keep their format; Azure is written "
                         "as native JSONL without --keep-format", field="--keep-format")
    to_line = _mooncake_line if args.keep_format and fmt == "mooncake" else native_line
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the slice is an ordinary file
    except OSError as exc:
        raise InputError(f"cannot write to {target.parent}: {exc.strerror}",
                         field="--output") from None
    count, last_arrival = 0, 0.0
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for request in requests:
                out.write(to_line(request) + "\n")
                count, last_arrival = count + 1, request.arrival_s
        os.replace(temporary, target)
    except BaseException as exc:
        os.unlink(temporary)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {target}: {exc.strerror}", field="--output") from None
        raise
    written = "Mooncake" if to_line is _mooncake_line else "native"
    print(f"wrote {count:,} requests spanning {last_arrival:,.1f} s to {target} ({written} JSONL)")
    return 0


def native_line(request: TraceRequest) -> str:
    """One line of native JSONL for `request` (optional fields only when set)."""
    row: dict = {"arrival_s": request.arrival_s, "input_tokens": request.input_tokens,
                 "output_tokens": request.output_tokens}
    if request.prefix_blocks:
        row["prefix_blocks"] = list(request.prefix_blocks)
    if request.block_tokens != 512:
        row["block_tokens"] = request.block_tokens
    if request.session_id is not None:
        row["session_id"] = request.session_id
    if request.prompt is not None:
        row["prompt"] = request.prompt
    if request.messages is not None:
        row["messages"] = list(request.messages)
    return json.dumps(row, ensure_ascii=False)


def _mooncake_line(request: TraceRequest) -> str:
    """Mooncake's own layout; arrival rounded to whole milliseconds as in the original traces."""
    return json.dumps({"timestamp": round(request.arrival_s * 1000),
                       "input_length": request.input_tokens, "output_length": request.output_tokens,
                       "hash_ids": list(request.prefix_blocks)})
