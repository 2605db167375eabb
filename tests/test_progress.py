"""Live progress: a running trial writes its progress file, the lead shows one line per running trial
(in place on a terminal, plain lines now and then otherwise); the ETA counts trial durations in waves."""

from __future__ import annotations

import io
import json
import threading
import time

from tuner.engines.base import Launch
from tuner.loadgen.slo import parse_slo
from tuner.runner.progress import PROGRESS_FILE, LiveLines, Progress, eta_s, read_progress
from tuner.runner.trial import TrialSpec, execute_trial
from tuner.space.knobs import load_space
from tuner.workload.request import TraceRequest


def _sim_trial(tmp_path, requests: int = 30) -> TrialSpec:
    space = load_space("sim")
    trace = [TraceRequest(arrival_s=i * 1.0, input_tokens=200, output_tokens=40) for i in range(requests)]
    launch = Launch(config=space.defaults(), model="tiny-llama", baseline=True, time_scale=10.0,
                    extra_args=("--startup-seconds", "5", "--max-model-len", "1024"))
    return TrialSpec(number=7, engine="sim", space=space, launch=launch, requests=trace, out_dir=tmp_path,
                     warmup_requests=0, slo=parse_slo("ttft_p99=5s,tpot_p99=1s"), startup_timeout_s=60,
                     request_timeout_s=60)


def test_a_running_trial_shows_live_lines_that_go_when_it_ends(tmp_path):
    spec = _sim_trial(tmp_path)
    trial_dir = tmp_path / spec.run_name
    stream = io.StringIO()
    live = LiveLines(stream, plain_every_s=0.0, tty=False)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("o", execute_trial(spec)))
    worker.start()
    seen: list[Progress] = []
    while worker.is_alive():
        live.show([trial_dir])
        progress = read_progress(trial_dir / PROGRESS_FILE)
        if progress is not None:
            seen.append(progress)
        time.sleep(0.2)
    worker.join()
    assert outcome["o"].ok, outcome["o"].message
    assert seen[0].phase == "starting" and "trial 7: starting the server" in stream.getvalue()
    measuring = [p for p in seen if p.phase == "measuring"]
    assert measuring and measuring[-1].total == 30 and 0 < measuring[-1].done <= 30
    assert measuring[-1].p99_ttft_ms is not None and measuring[-1].goodput is not None
    assert "/30 requests" in stream.getvalue() and "TTFT p99" in stream.getvalue()
    assert not (trial_dir / PROGRESS_FILE).exists()  # the trial took its line away


def _write(trial_dir, **fields) -> None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / PROGRESS_FILE).write_text(json.dumps({"number": 1, "label": "", "phase": "measuring", **fields}))


def test_tty_lines_are_redrawn_in_place_and_cleared_before_other_output(tmp_path):
    a, b = tmp_path / "trial-0001", tmp_path / "trial-0002"
    _write(a, done=10, total=100, p99_ttft_ms=250.0, p99_tpot_ms=22.5, goodput=1.5, elapsed_s=12.0)
    _write(b, number=2, phase="starting")
    stream = io.StringIO()
    live = LiveLines(stream, tty=True)
    live.show([a, b, tmp_path / "trial-0003"])  # a trial with no file yet has no line
    first = stream.getvalue()
    assert first == ("  trial 1: 10/100 requests, TTFT p99 250 ms, TPOT p99 22.5 ms, goodput 1.50 req/s (12 s)\n"
                     "  trial 2: starting the server\n")
    live.show([a, b])
    assert stream.getvalue()[len(first):].startswith("\x1b[2F\x1b[J")  # up two lines, erase, redraw
    live.clear()
    assert stream.getvalue().endswith("\x1b[2F\x1b[J") and live.drawn == 0


def test_plain_lines_when_not_a_terminal_come_every_interval(tmp_path):
    a = tmp_path / "trial-0001"
    _write(a, done=1, total=4)
    stream = io.StringIO()
    live = LiveLines(stream, plain_every_s=30.0, tty=False)
    live.show([a])
    assert stream.getvalue() == ""  # not 30 s yet
    live.last_plain -= 31
    live.show([a])
    live.show([a])
    assert stream.getvalue() == "  trial 1: 1/4 requests (0 s)\n" and "\x1b" not in stream.getvalue()


def test_eta_counts_trials_in_waves_of_those_running_at_once():
    assert eta_s([], 10, 2) is None
    assert eta_s([60.0, 120.0], 10, 1) == 900.0
    assert eta_s([60.0, 120.0], 10, 4) == 270.0  # ceil(10 / 4) = 3 waves of 90 s
    assert eta_s([60.0], 0, 4) == 0.0
