"""Generated bad input for the trace readers, YAML search spaces and `tune run` options.

Whatever comes in, the answer is a result or one line naming where the problem is (exit code 2), never a
traceback. CI runs FUZZ_EXAMPLES inputs per target; `experiments/benchmarks/fuzz.py` runs the same checks
on 1,000 or more and counts accepted, rejected and crashed inputs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tuner.cli import main
from tuner.errors import InputError
from tuner.space.flags import render_flags, render_options
from tuner.space.knobs import _KNOB_FIELDS, KNOB_TYPES, SPACES_DIR, load_space
from tuner.study.sampling import suggest_config

optuna.logging.set_verbosity(optuna.logging.WARNING)
FUZZ_EXAMPLES = int(os.environ.get("SERVETUNE_FUZZ_EXAMPLES", "50"))
WORK = Path(tempfile.mkdtemp(prefix="servetune-fuzz-"))  # one directory for every generated file
ERROR_LINE = re.compile(r"^tune( \w+)*: error: .+\n$")
fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`tune ARGV` in this process: (exit code, stdout, stderr). Any exception but SystemExit is a crash."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, names: str | None = None) -> None:
    assert code == 2, (code, err)
    assert ERROR_LINE.match(err), f"not one error line: {err!r}"
    assert "Traceback" not in err
    if names is not None:
        assert names in err, f"the error does not say where: {err!r}"


# --- values: mostly plausible, sometimes anything JSON can hold ------------------------------------

huge_numbers = st.sampled_from([2**31, 2**63, 2**64, -2**63 - 1, 10**30, 10**400, 1e308, -0.0, 5e-324])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), huge_numbers,
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
counts = st.one_of(st.integers(0, 20000), st.integers(0, 20000), json_values)


def _maybe(values):
    return st.one_of(values, values, values, json_values)


def _clean_or_maybe(clean: bool, values):
    """Plausible values only in a clean file, now and then anything in another."""
    return values if clean else _maybe(values)


def _in_order(rows: list[dict], key: str, kind: type) -> None:
    """Sort the well-typed values of `key` into arrival order, in place (the rest stay as they are)."""
    typed = [row for row in rows if isinstance(row[key], kind)]
    for row, value in zip(typed, sorted(row[key] for row in typed)):
        row[key] = value


@st.composite
def mooncake_lines(draw) -> list[str]:
    clean = draw(st.booleans())
    length = _clean_or_maybe(clean, st.integers(0, 20000))
    rows = draw(st.lists(st.fixed_dictionaries(
        {"timestamp": _clean_or_maybe(clean, st.integers(0, 10**7)), "input_length": length, "output_length": length},
        optional={"hash_ids": _clean_or_maybe(clean, st.lists(st.integers(0, 10**6), max_size=6)),
                  **({} if clean else {"extra": json_values})}), max_size=8))
    if draw(st.booleans()):
        _in_order(rows, "timestamp", int)
    return [json.dumps(r) for r in rows]


@st.composite
def native_lines(draw) -> list[str]:
    clean = draw(st.booleans())
    text = st.text(max_size=20)
    count = _clean_or_maybe(clean, st.integers(0, 20000))
    rows = draw(st.lists(st.fixed_dictionaries(
        {"arrival_s": _clean_or_maybe(clean, st.floats(0, 1e4)), "output_tokens": count}, optional={
            "input_tokens": count, "prompt": _clean_or_maybe(clean, text),
            "messages": _clean_or_maybe(clean, st.lists(st.fixed_dictionaries(
                {"role": _clean_or_maybe(clean, text), "content": _clean_or_maybe(clean, text)}), min_size=1,
                max_size=3)),
            "prefix_blocks": _clean_or_maybe(clean, st.lists(st.integers(0, 100), max_size=4)),
            "block_tokens": _clean_or_maybe(clean, st.integers(1, 1024)),
            "session_id": _clean_or_maybe(clean, text), **({} if clean else {"unknown_field": json_values})}),
        max_size=8))
    if draw(st.booleans()):
        _in_order(rows, "arrival_s", float)
    return [json.dumps(r) for r in rows]


@st.composite
def azure_lines(draw) -> list[str]:
    columns = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    header = draw(st.one_of(st.just(columns), st.permutations(columns + ["Extra"]),
                            st.lists(st.sampled_from(columns + ["x", ""]), max_size=4)))
    stamp = st.builds("{:04d}-{:02d}-{:02d} {:02d}:{:02d}:{:02d}{}{}".format, st.integers(0, 9999),
                      st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61),
                      st.integers(0, 61), st.sampled_from(["", ".5", ".6805900", ".1234567891"]),
                      st.sampled_from(["", "Z", "+00:00", "-0530", "+99:99"]))
    if draw(st.booleans()):  # clean rows in the header's columns, times in order
        good_stamp = st.builds("2023-11-16 18:{:02d}:{:02d}.{}".format, st.integers(0, 59), st.integers(0, 59),
                               st.integers(0, 10**7))
        rows = draw(st.lists(st.tuples(good_stamp, st.integers(0, 10**5), st.integers(0, 10**4)), max_size=6))
        index = {name: header.index(name) for name in columns if name in header}
        lines = [",".join(header)]
        for row in sorted(rows):
            cells = ["1"] * len(header)
            for name, value in zip(columns, row):
                if name in index:
                    cells[index[name]] = str(value)
            lines.append(",".join(cells))
        return lines
    cell = {"TIMESTAMP": _maybe(stamp), "ContextTokens": _maybe(st.integers(-5, 10**6)),
            "GeneratedTokens": _maybe(st.integers(-5, 10**6))}
    rows = draw(st.lists(st.lists(st.one_of(*cell.values()), min_size=len(header), max_size=len(header) + 1),
                         max_size=6))
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join(json.dumps(v) if not isinstance(v, str) else v for v in row))
    return lines


@st.composite
def trace_files(draw) -> bytes:
    """A trace file: lines in one of the three formats, maybe with junk lines, blank lines, a BOM, raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    lines = draw(st.one_of(mooncake_lines(), native_lines(), azure_lines()))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        junk = draw(st.one_of(st.text(max_size=30), st.just(""), st.just("{"), st.just("[1, 2]"),
                              st.just('{"timestamp": 1e999}'), st.just('{"arrival_s": NaN}'),
                              st.just('{"timestamp": 0, "input_length": ' + "9" * 5000 + "}"),
                              st.just("2023-11-16 18:15:46,1" + "0" * 5000 + ",1")))
        lines.insert(draw(st.integers(0, len(lines))), junk)
    data = draw(st.sampled_from(["\n", "\r\n"])).join(lines).encode("utf-8", errors="surrogatepass")
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + data


inspect_options = st.lists(st.sampled_from([["--json"], ["--rows", "3"], ["--seconds", "1.5"],
                                            ["--time-scale", "4"], ["--format", "mooncake"],
                                            ["--format", "azure"], ["--format", "native"]]),
                           max_size=2).map(lambda groups: [word for group in groups for word in group])


def check_trace(content: bytes, options: list[str]) -> str:
    """'accepted' or 'rejected'; an AssertionError (or any other exception) is a crash."""
    path = WORK / "trace.jsonl"
    path.write_bytes(content)
    code, out, err = run_cli(["workload", "inspect", str(path), *options])
    if code == 0:
        assert out and not err, err
        return "accepted"
    assert_one_line_error(code, err, names=str(path))
    return "rejected"


# --- YAML search spaces ------------------------------------------------------------------------

knob_names = st.sampled_from(["max_num_seqs", "a", "b", "gpu_memory_utilization", "x y", "1"])
numbers = st.one_of(st.integers(-10, 5000), st.floats(-10, 5000))
knob_specs = st.fixed_dictionaries({}, optional={
    "type": _maybe(st.sampled_from([*KNOB_TYPES, "weird"])), "choices": _maybe(st.lists(json_scalars, max_size=4)),
    "low": _maybe(numbers), "high": _maybe(numbers), "log": _maybe(st.booleans()), "step": _maybe(numbers),
    "default": json_values, "group": _maybe(st.text(max_size=5)),
    "when": _maybe(st.sampled_from(["a == 1", "b != x", "max_num_seqs == 8", "nonsense"])),
    "flag": _maybe(st.sampled_from(["--x", "--max-num-seqs", ["--a", "--b"], None])),
    "flag_off": _maybe(st.sampled_from(["--no-x", None])), "omit": _maybe(st.lists(json_scalars, max_size=2)),
    "json_flag": _maybe(st.sampled_from(["--speculative-config", None])),
    "json_key": _maybe(st.sampled_from(["method", None])), "value_from": _maybe(st.sampled_from(["a", "b", None])),
    "doc": _maybe(st.text(max_size=5)), "unknown_key": json_values})
space_documents = st.one_of(
    st.fixed_dictionaries({"knobs": _maybe(st.dictionaries(knob_names, _maybe(knob_specs), max_size=4))}, optional={
        "engine": _maybe(st.sampled_from(["sim", "vllm"])),
        "extends": _maybe(st.sampled_from(["common.yaml", "missing.yaml", ".", "", "sim.yaml"]))}),
    json_values)


SHIPPED = {name: yaml.safe_load((SPACES_DIR / f"{name}.yaml").read_text())
           for name in ("sim", "vllm", "sglang", "trtllm")}
KNOB_FIELDS = sorted(_KNOB_FIELDS)


@st.composite
def mutated_shipped_spaces(draw) -> dict:
    """A shipped engine space with a few knob fields set to other values, removed, or added."""
    document = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(document["knobs"])))
        spec = document["knobs"][name] = dict(document["knobs"][name] or {})
        key = draw(st.sampled_from(KNOB_FIELDS))
        if draw(st.integers(0, 3)) == 0:
            spec.pop(key, None)
        else:
            spec[key] = draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=3), numbers,
                                       st.sampled_from(["int", "float", "categorical", "bool", "a == b"])))
    return document


@st.composite
def space_texts(draw) -> str:
    document = draw(st.one_of(mutated_shipped_spaces(), space_documents))
    text = yaml.safe_dump(document, allow_unicode=True)
    if draw(st.integers(0, 4)) == 0:  # broken YAML: a piece cut out, or junk put in
        start = draw(st.integers(0, len(text)))
        text = text[:start] + draw(st.sampled_from(["", ":", "\t", "- ", "{", "'", "&a *b", "%YAML 9"])) + \
            text[start + draw(st.integers(0, 10)):]
    return text


def check_space(text: str) -> str:
    """A space loads (and then samples and renders) or is an InputError naming a file; nothing else."""
    path = WORK / "space.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        space = load_space(str(path))
        study = optuna.create_study(directions=["maximize"])
        _, config = suggest_config(study.ask(), {space.engine: space})
        render_flags(space, config)
        render_flags(space, space.defaults(), baseline=True)
        render_options(space, config)
    except InputError as exc:
        assert exc.file is not None, f"no file named: {exc}"
        assert "\n" not in str(exc)
        return "rejected"
    return "accepted"


# --- `tune run` options ----------------------------------------------------------------------

SENTINEL_KNOB = "no_such_knob_fuzz"  # an unknown --fix knob: every argv fails before Ray or a server starts
GOOD_TRACE = Path(__file__).resolve().parents[1] / "workloads" / "mooncake_conversation_head300.jsonl"
option_values = {
    "--gpus": st.one_of(st.integers(-3, 9).map(str), st.text(max_size=4)),
    "--trials": st.one_of(st.integers(-3, 50).map(str), st.text(max_size=4)),
    "--budget": st.one_of(st.sampled_from(["90m", "2h", "10s", "0", "-1h", "1.5h", "h", "5d", "1e3"]),
                          st.text(max_size=6)),
    "--slo": st.one_of(st.sampled_from(["ttft_p99=800ms,tpot_p99=60ms", "ttft_p0=1", "e2e_p100=1s",
                                        "ttft_p99=0", "ttft_p99=800ms,ttft_p99=1s", "foo_p9=1", ",", "="]),
                       st.text(max_size=12)),
    "--latency": st.one_of(st.sampled_from(["ttft_p99,tpot_p99", "e2e_mean", "itl_max", "ttft_p42", ""]),
                           st.text(max_size=10)),
    "--fix": st.one_of(st.sampled_from(["max_num_seqs=64", "max_num_seqs=0", "max_num_seqs=abc",
                                        "gpu_memory_utilization=nan", "gpu_memory_utilization=0.9",
                                        "enable_prefix_caching=maybe", "quantization=fp8", "=", "nothing"]),
                       st.text(max_size=10)),
    "--exclude": st.one_of(st.sampled_from(["speculative", "max_num_seqs", "nope"]), st.text(max_size=6)),
    "--rows": st.one_of(st.integers(-2, 400).map(str), st.text(max_size=4)),
    "--seconds": st.one_of(st.sampled_from(["1", "0", "-1", "nan", "inf", "1e-9"]), st.text(max_size=4)),
    "--time-scale": st.one_of(st.sampled_from(["1", "0", "-2", "nan", "inf", "1e308"]), st.text(max_size=4)),
    "--max-model-len": st.one_of(st.sampled_from(["4096", "0", "-5", "1", "99999999999"]), st.text(max_size=4)),
    "--concurrency": st.one_of(st.integers(-2, 8).map(str), st.text(max_size=3)),
    "--max-concurrency": st.one_of(st.integers(-2, 8).map(str), st.text(max_size=3)),
    "--sim-time-scale": st.one_of(st.sampled_from(["10", "0", "-1", "nan", "inf"]), st.text(max_size=4)),
    "--startup-timeout": st.one_of(st.sampled_from(["600", "0", "-1", "nan"]), st.text(max_size=4)),
    "--engine": st.one_of(st.sampled_from(["sim", "vllm,sim", "sglang", "nope", ",", ""]), st.text(max_size=6)),
    "--sampler": st.sampled_from(["tpe", "nsga2", "random", "grid", "annealing"]),
    "--model": st.sampled_from(["llama-3.1-8b", "tiny-llama", "no-such-shape", ""]),
    "--format": st.sampled_from(["mooncake", "azure", "native", "csv"]),
    "--engine-env": st.one_of(st.sampled_from(["A=1", "NOEQUALS", "=x"]), st.text(max_size=6)),
    "--host": st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "", "::1", "a b", "300.1.1.1"]),
    "--out": st.sampled_from([str(GOOD_TRACE), str(GOOD_TRACE / "below-a-file"), "/proc/no-dir-here"]),
    "--engine-arg": st.one_of(st.sampled_from(["--enforce-eager", "'unbalanced", '"x', "--seed 3"]),
                              st.text(max_size=6)),
    "--workload": st.sampled_from(["/nonexistent.jsonl", "/proc", str(GOOD_TRACE)]),
    "--storage": st.one_of(st.sampled_from(["garbage", "foo://x", "sqlite://", "journal://", "postgresql://u:p@h/d",
                                            f"sqlite:///{WORK}/runs/other.db", "mysql://", "sqlite:////proc/x/y"]),
                           st.text(max_size=12)),
    "--ray-address": st.one_of(st.sampled_from(["auto", "local", "garbage:xx", "h:0", "h:65536", "ray://h:10001",
                                                "10.0.0.5:6379", ":", ""]), st.text(max_size=10)),
    "--study-name": st.one_of(st.sampled_from(["ok", "../../x", "a/b", "..", ".", "a\\b", "x" * 201]),
                              st.text(max_size=8)),
}


@st.composite
def run_argvs(draw) -> list[str]:
    argv = ["run", "--workload", str(GOOD_TRACE), "--engine", "sim", "--out", str(WORK / "runs"),
            "--no-mlflow", "--rows", "20"]
    for option in draw(st.lists(st.sampled_from(sorted(option_values)), min_size=1, max_size=4)):
        argv.append(f"{option}={draw(option_values[option])}")
    return [*argv, "--fix", f"{SENTINEL_KNOB}=1"]


def check_argv(argv: list[str]) -> str:
    """'accepted' when only the sentinel knob was wrong, 'rejected' when a generated option was."""
    shutil.rmtree(WORK / "runs", ignore_errors=True)
    code, _, err = run_cli(argv)
    assert_one_line_error(code, err)
    assert "Ray" not in err and not (WORK / "runs" / "optuna.db").exists(), "it got as far as the study"
    return "accepted" if SENTINEL_KNOB in err else "rejected"


# --- `--storage` as every command that opens a store reads it ---------------------------------

storage_urls = st.one_of(
    st.builds(lambda scheme, rest: scheme + rest,
              st.sampled_from(["sqlite:///", "sqlite://", "journal://", "journal:///", "postgresql://",
                               "mysql+pymysql://", "foo://", "", "sqlite:////proc/"]),
              st.one_of(st.sampled_from(["", "u:SECRETPW@127.0.0.1:1/db", f"{WORK}/missing.db", ":memory:",
                                         "/proc/no/such.db", "?mode=ro", "%00"]), st.text(max_size=10))),
    st.text(max_size=20))


def check_storage(url: str) -> str:
    """`tune export --storage URL` opens the store without creating one: an answer is always one line."""
    before = set(WORK.rglob("*"))
    code, out, err = run_cli(["export", "--study", "fuzz", "--storage", url])
    assert_one_line_error(code, err, names="storage" if code == 2 and "no study named" not in err else None)
    with contextlib.suppress(ValueError):
        if urllib.parse.urlsplit(url).password:  # a password of the URL; the same text as a file name is no secret
            assert urllib.parse.urlsplit(url).password not in err + out
    assert set(WORK.rglob("*")) <= before, "a store was created"
    return "rejected"


# --- the simulator's HTTP endpoints --------------------------------------------------------------

SIM_KEY = "fuzz-key-0123456789"
_sim: dict[str, object] = {}


def sim_url() -> str:
    """One `tune sim-serve` for the whole run (key from the environment), stopped when Python exits."""
    if "url" not in _sim:
        import atexit
        import socket
        import subprocess
        import sys
        import time

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "tuner", "sim-serve", "--port", str(port), "--startup-seconds", "0",
             "--time-scale", "1000", "--max-model-len", "2048", "--served-model-name", "m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "SERVETUNE_API_KEY": SIM_KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        atexit.register(process.kill)
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "sim-serve did not start"
            time.sleep(0.1)
        _sim["url"] = f"http://127.0.0.1:{port}"
    return str(_sim["url"])


ROUTES = ["/health", "/version", "/metrics", "/sim/info", "/reset_prefix_cache", "/v1/models", "/v1/completions",
          "/v1/chat/completions"]
http_requests = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    "path": st.one_of(st.sampled_from(ROUTES), st.builds(lambda a, b: a + b, st.sampled_from(ROUTES),
                                                         st.text(st.characters(codec="ascii"), max_size=8))),
    "auth": st.sampled_from(["right", "wrong", "none", "basic"]),
    "headers": st.dictionaries(st.sampled_from(["Content-Type", "Accept", "X-Forwarded-For", "Content-Encoding"]),
                               st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20), max_size=3),
    "body": st.one_of(st.none(), st.binary(max_size=64),
                      json_values.map(lambda v: json.dumps(v).encode()),
                      st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 5),
                                                                                                 max_size=4)),
                                             "max_tokens": st.one_of(st.integers(-1, 40), json_scalars)},
                                            optional={"stream": json_scalars, "model": st.sampled_from(["m", "x"]),
                                                      "min_tokens": st.integers(-1, 50), "n": json_scalars,
                                                      "stream_options": json_values, "messages": json_values}
                                            ).map(lambda v: json.dumps(v).encode())),
})


def check_sim_http(request: dict) -> str:
    """Never a 500, never the key; without the right key nothing but /health answers 2xx."""
    import urllib.error
    import urllib.parse
    import urllib.request

    path = urllib.parse.quote(request["path"], safe="/")
    headers = {"Authorization": {"right": f"Bearer {SIM_KEY}", "wrong": f"Bearer {SIM_KEY}x", "none": None,
                                 "basic": "Basic Zm9vOmJhcg=="}[request["auth"]], **request["headers"]}
    message = urllib.request.Request(sim_url() + path, data=request["body"], method=request["method"],
                                     headers={k: v for k, v in headers.items() if v is not None})
    try:
        with urllib.request.urlopen(message, timeout=30) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    assert status < 500, (status, body[:200])
    assert SIM_KEY.encode() not in body
    if request["auth"] != "right" and request["path"] != "/health":
        assert status == 401, (status, body[:200])
    return "accepted" if status < 400 else "rejected"


# --- the tests -------------------------------------------------------------------------------

@fuzz_settings
@given(content=trace_files(), options=inspect_options)
def test_trace_readers_answer_or_name_the_problem(content, options):
    check_trace(content, options)


@fuzz_settings
@given(text=space_texts())
def test_yaml_spaces_load_or_raise_input_error(text):
    check_space(text)


@fuzz_settings
@given(argv=run_argvs())
def test_run_options_fail_fast_with_one_line(argv):
    check_argv(argv)


@fuzz_settings
@given(url=storage_urls)
@example(url="sqlite:///?mode=ro")  # found by fuzz.py: SQLAlchemy's warning was a second line
@example(url="journal://u:SECRETPW@127.0.0.1:1/db")  # found by fuzz.py: the "password" in the path was shown
def test_storage_urls_open_or_fail_with_one_line(url):
    check_storage(url)


@fuzz_settings
@given(request=http_requests)
def test_simulator_http_never_500_and_never_the_key(request):
    check_sim_http(request)


@pytest.mark.parametrize("option, value, field", [
    ("--max-model-len", "-5", "max-model-len"), ("--concurrency", "0", "concurrency"),
    ("--max-concurrency", "-1", "max-concurrency"), ("--sim-time-scale", "0", "sim-time-scale"),
    ("--sim-time-scale", "nan", "sim-time-scale"), ("--startup-timeout", "-1", "startup-timeout"),
    ("--host", "::1", "host"), ("--budget", "0", "budget"),
])
def test_values_a_server_would_reject_are_rejected_before_any_starts(option, value, field):
    code, _, err = run_cli(["run", "--workload", str(GOOD_TRACE), "--engine", "sim", "--no-mlflow",
                            "--out", str(WORK / "runs"), "--rows", "5", f"{option}={value}"])
    assert_one_line_error(code, err, names=field)
    assert not (WORK / "runs" / "optuna.db").exists()
