"""The `tune` entry point: --version, bare help, a mistyped subcommand, defaults in --help, bench --wait-ready."""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tuner import __version__
from tuner.cli import main
from tuner.errors import InputError
from tuner.loadgen.cli import wait_ready


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"servetune {__version__}"


def test_bare_tune_prints_help_not_a_missing_workload_error(capsys):
    assert main([]) == 0
    out = capsys.readouterr()
    assert "usage: tune" in out.out and "sim-serve" in out.out and "export" in out.out
    assert "--workload" not in out.err


def test_mistyped_subcommand_suggests_the_close_one_and_exits_2(capsys):
    assert main(["exprot", "--study", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'exprot'" in err and "did you mean 'export'?" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["zzzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_options_still_default_to_the_run_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--trials", "3"])  # `tune --trials 3` is `tune run --trials 3`: it wants a workload
    assert exit_info.value.code == 2
    assert "--workload" in capsys.readouterr().err


def test_help_shows_defaults_once(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 127.0.0.1)" not in text  # its help already names the default
    assert "--sampler {tpe,nsga2,random,grid}" in text and "(default: tpe)" in text
    assert "(default: 600.0)" in text  # --startup-timeout
    assert "--eta ETA successive halving keeps the top 1/eta at each rung (default: 2.0)" in text
    assert "(default: 2 for real engines with --slo, else 0)" in text  # --finalists names its own default
    assert "(default: None)" not in text and "(default: False)" not in text


def _imported(argv: list[str], cwd: Path) -> set[str]:
    """The top-level packages a `tune` command imported (python -X importtime, read from stderr)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "tuner", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
            if line.startswith("import time:")}


def test_report_imports_neither_ray_nor_mlflow_nor_the_load_generator(tmp_path):
    store = tmp_path / "optuna.db"
    shutil.copy(Path(__file__).parents[1] / "experiments" / "h100-vllm" / "optuna.db", store)
    imported = _imported(["report", "h100-vllm-mooncake40", "--storage", f"sqlite:///{store}", "--no-mlflow",
                          "--out", str(tmp_path / "out")], tmp_path)
    assert {"optuna", "matplotlib"} <= imported  # what the report needs (the check itself works)
    assert not imported & {"ray", "mlflow", "aiohttp"}
    assert (tmp_path / "out" / "report.md").exists()


def test_report_without_matplotlib_writes_everything_but_the_pngs_and_says_so(tmp_path):
    """matplotlib is the `plots` extra: a plain install still gets the report, pareto.html and pareto.txt."""
    store = tmp_path / "optuna.db"
    shutil.copy(Path(__file__).parents[1] / "experiments" / "h100-vllm" / "optuna.db", store)
    argv = ["report", "h100-vllm-mooncake40", "--storage", f"sqlite:///{store}", "--no-mlflow", "--out", "out"]
    script = f"import sys; sys.modules['matplotlib'] = None; from tuner.cli import main; sys.exit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: no PNG figures: matplotlib is not installed (pip install 'servetune[plots]')" in done.stdout
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == ["pareto.html", "pareto.txt", "report.md"]
    report = (out / "report.md").read_text()
    assert ".png" not in report and "[pareto.html](pareto.html)" in report and "## Pareto front" in report


def test_help_of_one_subcommand_imports_only_that_one(tmp_path):
    imported = _imported(["export", "--help"], tmp_path)
    assert not imported & {"numpy", "aiohttp", "ray", "mlflow", "matplotlib"}


class _SlowStart(http.server.BaseHTTPRequestHandler):
    """503 until `ready_at`, then 200 on /v1/models: a server warming up."""

    ready_at = 0.0

    def do_GET(self) -> None:  # noqa: N802
        ready = time.monotonic() >= self.ready_at and self.path == "/v1/models"
        self.send_response(200 if ready else 503)
        self.end_headers()
        self.wfile.write(b'{"data": [{"id": "m"}]}' if ready else b"warming up")

    def log_message(self, *args) -> None:
        pass


def test_wait_ready_polls_until_the_server_answers():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowStart)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _SlowStart.ready_at = time.monotonic() + 1.0  # after the server's start, which a busy machine may delay
    try:
        waited = wait_ready(f"http://127.0.0.1:{server.server_port}", timeout_s=10, poll_s=0.1)
    finally:
        server.shutdown()
    assert 0.9 <= waited < 5


def test_wait_ready_gives_up_with_one_line_naming_the_option():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    started = time.monotonic()
    with pytest.raises(InputError, match=r"--wait-ready.*not ready after 0.5 s"):
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=0.5, poll_s=0.1)
    assert time.monotonic() - started < 5


def test_engine_options_can_name_one_engine_of_the_study():
    from tuner.study.cli import per_engine
    from tuner.study.tune import TuneOptions

    engines = ["vllm", "sglang"]
    assert per_engine(["vllm=/venvs/vllm/bin/python", "/usr/bin/python3", "a=b/python"], "=", engines,
                      "engine-python") == {"vllm": ["/venvs/vllm/bin/python"], "": ["/usr/bin/python3", "a=b/python"]}
    assert per_engine(["sglang:--attention-backend triton", "--seed 1", "A=b:c"], ":", engines, "engine-arg") == {
        "sglang": ["--attention-backend triton"], "": ["--seed 1", "A=b:c"]}
    with pytest.raises(InputError, match="for sglang, which this study does not tune"):
        per_engine(["sglang:--attention-backend triton"], ":", ["vllm"], "engine-arg")
    options = TuneOptions(workload=Path("w"), requests=[], workload_digest="", engines=engines, model="m", shape=None,
                          gpus=1, gpu=None, engine_args=["--seed", "1"],
                          engine_args_by={"sglang": ["--attention-backend", "triton"]},
                          engine_env_by={"vllm": [("VLLM_X", "1")]}, engine_pythons={"sglang": "/venvs/sglang/py"})
    assert options.args_for("sglang") == ["--seed", "1", "--attention-backend", "triton"]
    assert options.args_for("vllm") == ["--seed", "1"] and options.env_for("sglang") == []
    assert options.python_for("sglang") == "/venvs/sglang/py" and options.python_for("vllm") == sys.executable


def test_a_knob_can_be_held_for_one_engine_of_the_study():
    from tuner.study.cli import per_engine
    from tuner.study.tune import TuneOptions, build_spaces

    engines = ["vllm", "sglang"]
    fixes = per_engine(["sglang:attention_backend=triton", "max_num_seqs=64"], ":", engines, "fix")
    assert fixes == {"sglang": ["attention_backend=triton"], "": ["max_num_seqs=64"]}
    options = TuneOptions(workload=Path("w"), requests=[], workload_digest="", engines=engines, model="m", shape=None,
                          gpus=1, gpu=None, fix=fixes[""], fix_by={"sglang": fixes["sglang"]})
    spaces = build_spaces(options)
    assert spaces["sglang"].knobs["attention_backend"].choices == ("triton",)
    assert len(spaces["vllm"].knobs["attention_backend"].choices) > 1  # vLLM's backends are still searched
    assert all(space.knobs["max_num_seqs"].fixed_value == 64 for space in spaces.values())
    with pytest.raises(InputError, match="triton"):  # a value the other engine does not have: the error names it
        build_spaces(TuneOptions(workload=Path("w"), requests=[], workload_digest="", engines=engines, model="m",
                                 shape=None, gpus=1, gpu=None, fix=["attention_backend=triton"]))


def test_each_engine_of_a_study_is_probed_with_its_own_python(tmp_path, capsys):
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"arrival_s": 0, "input_tokens": 8, "output_tokens": 4}\n')
    code = main(["--workload", str(workload), "--engine", "sglang,vllm", "--model-shape", "tiny-llama",
                 "--engine-python", f"sglang={tmp_path / 'no-such-venv' / 'python'}", "--no-mlflow",
                 "--out", str(tmp_path / "runs"), "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"sglang is not importable by {tmp_path / 'no-such-venv' / 'python'}" in err
    assert "--engine-python sglang=PYTHON" in err
