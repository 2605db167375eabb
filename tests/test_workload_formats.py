"""Trace readers on the real slices and on handmade lines; bad input names file, line and field."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from tuner.errors import InputError
from tuner.workload.analysis import analyze
from tuner.workload.formats import detect_format, estimate_tokens, read_trace
from tuner.workload.request import TraceRequest
from tuner.workload.transform import first_rows, first_seconds, load_workload, time_scaled, trace_digest

WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"
MOONCAKE = WORKLOADS / "mooncake_conversation_head300.jsonl"
AZURE = WORKLOADS / "azure_conv_head500.csv"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def mooncake_line(timestamp=0, input_length=1000, output_length=10, hash_ids=(0, 1)) -> str:
    return json.dumps({"timestamp": timestamp, "input_length": input_length,
                       "output_length": output_length, "hash_ids": list(hash_ids)})


def test_mooncake_slice_parses_with_its_blocks():
    assert detect_format(MOONCAKE) == "mooncake"
    requests = list(read_trace(MOONCAKE))
    assert len(requests) == 300
    assert requests[0] == TraceRequest(arrival_s=0.0, input_tokens=6758, output_tokens=500,
                                       prefix_blocks=tuple(range(14)), block_tokens=512)
    assert requests[-1].arrival_s == 102.0
    assert all(len(r.prefix_blocks) == -(-r.input_tokens // 512) for r in requests)
    assert all(r.prefix_blocks[0] == 0 for r in requests)


def test_azure_slice_parses_times_relative_to_first_row():
    assert detect_format(AZURE) == "azure"
    requests = list(read_trace(AZURE))
    assert len(requests) == 500
    assert requests[0] == TraceRequest(arrival_s=0.0, input_tokens=374, output_tokens=44)
    # 18:15:50.9951690 - 18:15:46.6805900
    assert requests[1].arrival_s == pytest.approx(4.314579, abs=1e-9)
    assert (requests[1].input_tokens, requests[1].output_tokens) == (396, 109)
    assert requests[-1].arrival_s == pytest.approx(129.012474, abs=1e-6)


def test_azure_timestamp_variants(tmp_path):
    path = write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                    "2024-05-10 00:00:00.009930+00:00,10,1\n"
                                    "2024-05-10 00:00:01+00:00,11,2\n"
                                    "2024-05-10T00:00:02.5,12,3\n"
                                    "2024-05-10 02:00:03.25+02:00,13,4\n"
                                    "2024-05-11 00:00:00.0099300Z,14,5\n")
    arrivals = [r.arrival_s for r in read_trace(path)]
    assert arrivals == pytest.approx([0.0, 0.99007, 2.49007, 3.24007, 86400.0], abs=1e-9)


def test_azure_extra_columns_in_any_order(tmp_path):
    path = write(tmp_path, "t.csv", "TIMESTAMP,NumImages,GeneratedTokens,ContextTokens\r\n"
                                    "2025-01-01 00:00:00.5,2,7,300\r\n")
    assert list(read_trace(path)) == [TraceRequest(arrival_s=0.0, input_tokens=300, output_tokens=7)]


def test_native_fields_defaults_and_estimates(tmp_path):
    lines = [
        {"arrival_s": 0.5, "input_tokens": 40, "output_tokens": 8, "prefix_blocks": [7],
         "block_tokens": 32, "session_id": "s1"},
        {"arrival_s": 0.5, "output_tokens": 3, "prompt": "one two three four five"},
        {"arrival_s": 1.25, "output_tokens": 4, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there you"}]},
        {"arrival_s": 2, "input_tokens": 99, "output_tokens": 1, "prompt": "short"},
    ]
    path = write(tmp_path, "n.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert detect_format(path) == "native"
    first, from_prompt, from_messages, given = read_trace(path)
    assert first == TraceRequest(arrival_s=0.5, input_tokens=40, output_tokens=8, prefix_blocks=(7,),
                                 block_tokens=32, session_id="s1")
    assert from_prompt.input_tokens == 7  # 5 words x 1.3 = 6.5, rounded half up
    assert from_prompt.prompt == "one two three four five" and from_prompt.block_tokens == 512
    assert from_messages.input_tokens == 7  # 5 words
    assert from_messages.messages == tuple(lines[2]["messages"])
    assert given.input_tokens == 99  # a given count wins over the estimate
    assert estimate_tokens("", None) == 0 and estimate_tokens("a b", None) == 3


def test_blank_lines_crlf_and_bom_are_accepted(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (mooncake_line(0) + "\r\n\r\n   \n" + mooncake_line(5) + "\r\n")
                     .encode())
    assert [r.arrival_s for r in read_trace(path)] == [0.0, 0.005]


BAD_MOONCAKE = [
    ('{"timestamp": 1000, "output_length": 5, "hash_ids": []}', "input_length", "missing"),
    ('{"timestamp": 1000, "input_length": 1.5, "output_length": 5}', "input_length", "integer"),
    ('{"timestamp": 1000, "input_length": "3", "output_length": 5}', "input_length", "integer"),
    ('{"timestamp": 1000, "input_length": true, "output_length": 5}', "input_length", "integer"),
    ('{"timestamp": 1000, "input_length": 5, "output_length": -1}', "output_length", "non-negative"),
    ('{"input_length": 5, "output_length": 1}', "timestamp", "missing"),
    ('{"timestamp": "x", "input_length": 5, "output_length": 1}', "timestamp", "number"),
    ('{"timestamp": 1000, "input_length": 5, "output_length": 1, "hash_ids": [0, 1]}', "hash_ids",
     "2 blocks"),
    ('{"timestamp": 1000, "input_length": 5, "output_length": 1, "hash_ids": ["a"]}', "hash_ids", "list"),
    ('{"timestamp": 1000, "input_length": 5,', None, "not valid JSON"),
    ('[1, 2]', None, "JSON object"),
]


@pytest.mark.parametrize("bad_line, field, words", BAD_MOONCAKE)
def test_mooncake_errors_name_line_and_field(tmp_path, bad_line, field, words):
    path = write(tmp_path, "m.jsonl", mooncake_line(0) + "\n\n" + mooncake_line(1000) + "\n"
                 + bad_line + "\n")
    with pytest.raises(InputError) as caught:
        list(read_trace(path, "mooncake"))
    assert (caught.value.file, caught.value.line, caught.value.field) == (str(path), 4, field)
    assert words in caught.value.message


def test_time_going_backwards_is_an_error(tmp_path):
    path = write(tmp_path, "m.jsonl", mooncake_line(3000) + "\n" + mooncake_line(2999) + "\n")
    with pytest.raises(InputError, match="backwards") as caught:
        list(read_trace(path))
    assert (caught.value.line, caught.value.field) == (2, "timestamp")
    native = write(tmp_path, "n.jsonl", '{"arrival_s": 2, "input_tokens": 1, "output_tokens": 1}\n'
                                        '{"arrival_s": 1.5, "input_tokens": 1, "output_tokens": 1}\n')
    with pytest.raises(InputError, match="backwards") as caught:
        list(read_trace(native))
    assert (caught.value.line, caught.value.field) == (2, "arrival_s")
    azure = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                     "2023-11-16 18:15:46.6805900,1,1\n"
                                     "2023-11-16 18:15:46.6805899,1,1\n")
    with pytest.raises(InputError, match="backwards") as caught:
        list(read_trace(azure))
    assert (caught.value.line, caught.value.field) == (3, "TIMESTAMP")


BAD_AZURE = [
    ("2023-11-16 18:15:47.1,1.5,3", "ContextTokens", "integer"),
    ("2023-11-16 18:15:47.1,-4,3", "ContextTokens", "non-negative"),
    ("2023-11-16 18:15:47.1,4,", "GeneratedTokens", "integer"),
    ("2023-11-16 18:15:47.1,4", None, "expected 3"),
    ("16/11/2023 18:15:47,4,3", "TIMESTAMP", "expected a time"),
    ("2023-02-30 18:15:47,4,3", "TIMESTAMP", "not a valid date"),
    ('2023-11-16 18:15:47,"4,3', None, "CSV"),
]


@pytest.mark.parametrize("bad_row, field, words", BAD_AZURE)
def test_azure_errors_name_line_and_field(tmp_path, bad_row, field, words):
    path = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                    "2023-11-16 18:15:46.6805900,374,44\n" + bad_row + "\n")
    with pytest.raises(InputError) as caught:
        list(read_trace(path))
    assert (caught.value.line, caught.value.field) == (3, field)
    assert words in caught.value.message


BAD_NATIVE = [
    ({"arrival_s": 1, "output_tokens": 2}, "input_tokens", "missing"),
    ({"arrival_s": 1, "input_tokens": 2}, "output_tokens", "missing"),
    ({"arrival_s": 1, "input_tokens": 2.0, "output_tokens": 2}, "input_tokens", "integer"),
    ({"arrival_s": -1, "input_tokens": 2, "output_tokens": 2}, "arrival_s", "negative"),
    ({"arrival_s": 1, "input_tokens": 2, "output_tokens": 2, "block_tokens": 0}, "block_tokens",
     "positive"),
    ({"arrival_s": 1, "output_tokens": 2, "prompt": 5}, "prompt", "string"),
    ({"arrival_s": 1, "output_tokens": 2, "messages": [{"role": "user"}]}, "messages[0]", "content"),
    ({"arrival_s": 1, "input_tokens": 2, "output_tokens": 2, "session_id": 3}, "session_id", "string"),
    ({"arrival_s": 1, "input_tokens": 2, "output_tokens": 2, "ouput_tokens": 2}, "ouput_tokens",
     "unknown field"),
]


@pytest.mark.parametrize("bad_row, field, words", BAD_NATIVE)
def test_native_errors_name_line_and_field(tmp_path, bad_row, field, words):
    path = write(tmp_path, "n.jsonl", '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n'
                 + json.dumps(bad_row) + "\n")
    with pytest.raises(InputError) as caught:
        list(read_trace(path))
    assert (caught.value.line, caught.value.field) == (2, field)
    assert words in caught.value.message


def test_file_level_errors(tmp_path):
    empty = write(tmp_path, "empty.jsonl", "\n  \n")
    with pytest.raises(InputError, match="empty"):
        read_trace(empty)
    header_only = write(tmp_path, "h.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(InputError, match="no requests"):
        list(read_trace(header_only))
    with pytest.raises(InputError, match="unknown trace format 'parquet'"):
        read_trace(MOONCAKE, "parquet")
    with pytest.raises(InputError, match="no such file"):
        read_trace(tmp_path / "absent.jsonl")
    unknown = write(tmp_path, "u.txt", "hello\n")
    with pytest.raises(InputError, match="cannot tell") as caught:
        detect_format(unknown)
    assert caught.value.line == 1
    wrong_header = write(tmp_path, "w.csv", "TIMESTAMP,Context,GeneratedTokens\n")
    with pytest.raises(InputError) as caught:
        list(read_trace(wrong_header))
    assert (caught.value.line, caught.value.field) == (1, "ContextTokens")


def test_explicit_format_overrides_detection(tmp_path):
    with pytest.raises(InputError) as caught:
        list(read_trace(MOONCAKE, "native"))
    assert (caught.value.line, caught.value.field) == (1, "hash_ids")  # not a native field


def test_transforms_are_lazy_and_correct():
    requests = read_trace(MOONCAKE)
    assert [r.arrival_s for r in first_rows(requests, 3)] == [0.0, 0.0, 0.0]
    within = list(first_seconds(read_trace(MOONCAKE), 6.0))
    assert {r.arrival_s for r in within} == {0.0, 3.0, 5.999}
    assert [r.arrival_s for r in time_scaled(within[-2:], 2.0)] == [2.9995, 2.9995]

    def endless():
        t = 0.0
        while True:
            yield TraceRequest(arrival_s=t, input_tokens=1, output_tokens=1)
            t += 1.0
    assert len(list(first_seconds(endless(), 10))) == 10  # stops reading past the window


def test_load_workload_selects_rebases_and_scales(tmp_path):
    whole = load_workload(MOONCAKE)
    assert len(whole) == 300
    picked = load_workload(MOONCAKE, rows=50, seconds=9.0, time_scale=3.0)
    in_window = [r for r in whole if r.arrival_s < 9.0][:50]
    assert [r.arrival_s * 3.0 for r in picked] == pytest.approx([r.arrival_s for r in in_window])
    assert [r.input_tokens for r in picked] == [r.input_tokens for r in in_window]
    late = write(tmp_path, "late.jsonl", '{"arrival_s": 100, "input_tokens": 1, "output_tokens": 1}\n'
                                         '{"arrival_s": 104, "input_tokens": 1, "output_tokens": 1}\n')
    assert [r.arrival_s for r in load_workload(late, seconds=4.5)] == [0.0, 4.0]
    with pytest.raises(InputError) as caught:
        load_workload(MOONCAKE, time_scale=0)
    assert caught.value.field == "time_scale"


def test_trace_digest_is_sha256_of_bytes(tmp_path):
    import hashlib
    assert trace_digest(AZURE) == hashlib.sha256(AZURE.read_bytes()).hexdigest()


def test_large_mooncake_file_streams_in_bounded_memory(tmp_path):
    """40,000 rows (3.6 MB): reading holds one line at a time; analysing keeps only numbers."""
    rows = 40_000
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.writelines(f'{{"timestamp": {i * 10}, "input_length": 700, "output_length": 50, '
                     f'"hash_ids": [{i % 1000}, {i + 1000}]}}\n' for i in range(rows))
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_trace(path))
        _, read_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        stats = analyze(read_trace(path))
        _, analyze_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == rows and stats.rows == rows
    assert stats.prefix.blocks_unique == 1000 + rows
    assert read_peak < 1_000_000  # the file is 3.6 MB; reading it whole would exceed this
    # ~135 B/row here; holding the TraceRequest objects alone takes ~260 B/row
    assert analyze_peak < 200 * rows
