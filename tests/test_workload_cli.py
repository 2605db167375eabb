"""`tune workload inspect|slice` through the real `tune` entry point (tuner.cli.main)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import tuner.cli
from tuner.workload.formats import read_trace
from tuner.workload.transform import load_workload

WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"
MOONCAKE = WORKLOADS / "mooncake_conversation_head300.jsonl"
AZURE = WORKLOADS / "azure_conv_head500.csv"


@pytest.fixture(autouse=True)
def only_workload_subcommand(monkeypatch):
    """Build `tune` with just the workload subcommand, so these tests do not depend on the others."""
    monkeypatch.setattr(tuner.cli, "SUBCOMMANDS", {"workload": tuner.cli.SUBCOMMANDS["workload"]})


def tune(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = tuner.cli.main(["workload", *map(str, argv)])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_mooncake_slice(capsys):
    code, out, err = tune(capsys, "inspect", MOONCAKE)
    assert (code, err) == (0, "")
    assert "(mooncake, sha256 " in out and "whole trace" in out
    assert "requests               300" in out
    assert "time span              102.0 s" in out
    assert "8,490 total, 7,814 distinct" in out
    assert "8.0% of blocks repeat an earlier block" in out


def test_inspect_azure_slice_with_selection(capsys):
    code, out, _ = tune(capsys, "inspect", AZURE, "--rows", "100", "--time-scale", "2",
                        "--max-concurrency", "16")
    assert code == 0
    assert "first 100 requests, 2x faster" in out
    assert "at most 16 requests in flight" in out
    assert "requests               100" in out
    assert "no prefix blocks" in out


def test_inspect_json(capsys):
    code, out, _ = tune(capsys, "inspect", AZURE, "--seconds", "30", "--time-scale", "3",
                        "--max-concurrency", "4", "--json")
    assert code == 0
    report = json.loads(out)
    expected = [r for r in read_trace(AZURE) if r.arrival_s < 30]
    assert report["format"] == "azure"
    assert report["sha256"] == hashlib.sha256(AZURE.read_bytes()).hexdigest()
    assert report["selection"] == {"rows": None, "seconds": 30.0, "time_scale": 3.0,
                                   "max_concurrency": 4}
    assert report["stats"]["rows"] == len(expected)
    assert report["stats"]["span_s"] == pytest.approx(expected[-1].arrival_s / 3)
    assert report["stats"]["input_tokens"]["max"] == max(r.input_tokens for r in expected)
    assert report["stats"]["prefix"] is None


def test_slice_writes_native_jsonl_that_reads_back_the_same(capsys, tmp_path):
    out_path = tmp_path / "cut.jsonl"
    code, out, _ = tune(capsys, "slice", MOONCAKE, "-o", out_path, "--seconds", "20",
                        "--time-scale", "4")
    assert code == 0 and "native JSONL" in out
    written = list(read_trace(out_path))
    assert written == load_workload(MOONCAKE, seconds=20, time_scale=4)
    assert json.loads(out_path.read_text().splitlines()[0]) == {
        "arrival_s": 0.0, "input_tokens": 6758, "output_tokens": 500, "prefix_blocks": list(range(14))}

    azure_out = tmp_path / "azure.jsonl"
    assert tune(capsys, "slice", AZURE, "-o", azure_out, "--rows", "50")[0] == 0
    assert list(read_trace(azure_out, "native")) == load_workload(AZURE, rows=50)


def test_slice_keep_format_copies_mooncake_lines_exactly(capsys, tmp_path):
    out_path = tmp_path / "head.jsonl"
    assert tune(capsys, "slice", MOONCAKE, "-o", out_path, "--rows", "120", "--keep-format")[0] == 0
    original = MOONCAKE.read_text().splitlines(keepends=True)[:120]
    assert out_path.read_text() == "".join(original)

    faster = tmp_path / "fast.jsonl"
    assert tune(capsys, "slice", MOONCAKE, "-o", faster, "--rows", "120", "--keep-format",
                "--time-scale", "2")[0] == 0
    assert [json.loads(line)["timestamp"] for line in faster.read_text().splitlines()] == [
        round(json.loads(line)["timestamp"] / 2) for line in original]


def test_slice_refusals(capsys, tmp_path):
    code, _, err = tune(capsys, "slice", AZURE, "-o", tmp_path / "x.csv", "--keep-format")
    assert code == 2 and "field '--keep-format'" in err
    copy = tmp_path / "m.jsonl"
    copy.write_bytes(MOONCAKE.read_bytes())
    code, _, err = tune(capsys, "slice", copy, "-o", copy)
    assert code == 2 and "overwrite the input" in err
    assert copy.read_bytes() == MOONCAKE.read_bytes()


def test_slice_stopped_by_bad_line_leaves_no_file(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(MOONCAKE.read_text().splitlines()[0] + "\n" + '{"timestamp": 9}\n')
    target = tmp_path / "out.jsonl"
    code, _, err = tune(capsys, "slice", bad, "-o", target)
    assert code == 2 and f"{bad}:2: field 'input_length'" in err
    assert list(tmp_path.iterdir()) == [bad]


BAD_INPUTS = [
    ("m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
                '{"timestamp": 10, "input_length": 1.5, "output_length": 1}\n', ":2: field 'input_length'"),
    ("m.jsonl", '{"timestamp": 10, "input_length": 5, "output_length": 1}\n\n'
                '{"timestamp": 9, "input_length": 5, "output_length": 1}\n', ":3: field 'timestamp'"),
    ("m.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1,\n',
     ":2: not valid JSON"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,4,true\n",
     ":2: field 'GeneratedTokens'"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,4\n",
     ":2: expected 3"),
    ("n.jsonl", '{"arrival_s": 0, "output_tokens": 1}\n', ":1: field 'input_tokens'"),
    ("n.jsonl", '{"arrival_s": 0, "input_tokens": "3", "output_tokens": 1}\n',
     ":1: field 'input_tokens'"),
    ("e.jsonl", "", ": the trace file is empty"),
]


@pytest.mark.parametrize("name, content, where", BAD_INPUTS)
@pytest.mark.parametrize("action", ["inspect", "slice"])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, name, content, where, action):
    path = tmp_path / name
    path.write_text(content)
    extra = ["-o", str(tmp_path / "out.jsonl")] if action == "slice" else []
    code, out, err = tune(capsys, action, path, *extra)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tune: error: {path}{where}")


def test_bad_options_are_one_line_exit_2(capsys, tmp_path):
    for argv, words in [
        (["inspect", MOONCAKE, "--format", "parquet"], "unknown trace format 'parquet'"),
        (["inspect", tmp_path / "absent.jsonl"], "absent.jsonl: no such file"),
        (["inspect", MOONCAKE, "--rows", "0"], "--rows: expected a positive integer"),
        (["inspect", MOONCAKE, "--time-scale", "-1"], "--time-scale: expected a positive number"),
        (["inspect", MOONCAKE, "--seconds", "abc"], "--seconds: expected a positive number"),
        (["slice", MOONCAKE], "-o/--output"),
    ]:
        code, _, err = tune(capsys, *argv)
        assert code == 2, argv
        assert err.count("\n") == 1 and words in err, err


def test_explicit_format(capsys):
    code, out, _ = tune(capsys, "inspect", MOONCAKE, "--format", "mooncake", "--rows", "3")
    assert code == 0 and "requests               3" in out
    code, _, err = tune(capsys, "inspect", MOONCAKE, "--format", "azure")
    assert code == 2 and ":1: field 'TIMESTAMP': Azure CSV header lacks" in err
