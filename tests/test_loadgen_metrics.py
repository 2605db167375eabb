"""Summary maths against hand-computed values (numpy's linear-interpolation percentiles)."""

from __future__ import annotations

import csv
import json

import pytest

from tuner.loadgen.metrics import RequestResult, summarize, to_server_clock, tpot_s, wall_duration_s
from tuner.loadgen.replay import BenchResult, write_results
from tuner.loadgen.slo import parse_slo


def _row(index, ttft, e2e, out, itl, prompt, lag, error=None, sent=0.0, finished=1.0):
    return RequestResult(index=index, scheduled_s=sent, sent_s=sent, send_lag_s=lag,
                         finished_s=finished, ttft_s=ttft, itl_s=list(itl),
                         tpot_s=None if e2e is None else tpot_s(e2e, ttft, out), e2e_s=e2e,
                         prompt_tokens=prompt, output_tokens=out, requested_output_tokens=out,
                         error=error)


@pytest.fixture
def rows():
    return [
        _row(0, ttft=0.1, e2e=1.1, out=11, itl=[0.05, 0.15], prompt=100, lag=0.001),
        _row(1, ttft=0.3, e2e=0.8, out=6, itl=[0.2, 0.3], prompt=200, lag=0.002),
        _row(2, ttft=0.2, e2e=2.2, out=1, itl=[], prompt=300, lag=0.003),
        # failed mid-stream: it has a TTFT but must not enter any latency figure
        _row(3, ttft=0.01, e2e=None, out=2, itl=[9.0], prompt=400, lag=0.004, error="HTTP 500"),
    ]


def test_tpot_excludes_first_token_and_needs_two_tokens():
    assert tpot_s(1.1, 0.1, 11) == pytest.approx(0.1)
    assert tpot_s(2.2, 0.2, 1) is None


def test_counts_throughputs_and_tokens(rows):
    s = summarize(rows, duration_s=4.0)
    assert (s.completed, s.failed) == (3, 1)
    assert s.total_input_tokens == 600  # the failed request's 400 are not counted
    assert s.total_output_tokens == 18
    assert s.request_throughput == pytest.approx(0.75)
    assert s.output_throughput == pytest.approx(4.5)
    assert s.total_token_throughput == pytest.approx(154.5)


def test_latency_percentiles_exclude_failed(rows):
    s = summarize(rows, duration_s=4.0)
    # TTFT over [0.1, 0.3, 0.2]: p90 = 0.2 + 0.8 * 0.1, p99 = 0.2 + 0.98 * 0.1
    assert s.mean_ttft_ms == pytest.approx(200)
    assert s.median_ttft_ms == pytest.approx(200)
    assert s.p90_ttft_ms == pytest.approx(280)
    assert s.p99_ttft_ms == pytest.approx(298)
    assert s.max_ttft_ms == pytest.approx(300)
    # TPOT only for requests with >1 output token: (1.1-0.1)/10 and (0.8-0.3)/5
    assert s.mean_tpot_ms == pytest.approx(100)
    assert s.max_tpot_ms == pytest.approx(100)
    # ITL pools every gap of every completed request: [0.05, 0.15, 0.2, 0.3]
    assert s.mean_itl_ms == pytest.approx(175)
    assert s.median_itl_ms == pytest.approx(175)
    assert s.p90_itl_ms == pytest.approx(270)  # 0.2 + 0.7 * 0.1
    assert s.max_itl_ms == pytest.approx(300)
    # E2E over [1.1, 0.8, 2.2]
    assert s.mean_e2e_ms == pytest.approx(1366.6667)
    assert s.median_e2e_ms == pytest.approx(1100)
    assert s.p90_e2e_ms == pytest.approx(1980)  # 1.1 + 0.8 * 1.1


def test_send_lag_covers_every_request(rows):
    s = summarize(rows, duration_s=4.0)
    assert s.p50_send_lag_ms == pytest.approx(2.5)
    assert s.p99_send_lag_ms == pytest.approx(3.97)
    assert s.max_send_lag_ms == pytest.approx(4.0)


def test_goodput_counts_requests_meeting_every_slo(rows):
    s = summarize(rows, duration_s=4.0, slo=parse_slo("ttft_p99=250ms,e2e_p90=2s"))
    # row 0 meets both; row 1 misses TTFT (300 ms); row 2 misses E2E (2.2 s); row 3 failed
    assert s.good_completed == 1
    assert s.goodput == pytest.approx(0.25)
    assert s.slo_value_ms == pytest.approx({"ttft_p99": 298.0, "e2e_p90": 1980.0})
    assert s.slo_met == {"ttft_p99": False, "e2e_p90": True}
    assert s.slo == "ttft_p99=250ms,e2e_p90=2000ms"


def test_one_token_answer_passes_a_tpot_slo(rows):
    s = summarize(rows, duration_s=4.0, slo=parse_slo("tpot_p50=50ms"))
    assert s.good_completed == 1  # only row 2, which has no TPOT; rows 0 and 1 have 100 ms
    assert s.slo_met == {"tpot_p50": False}


def test_failed_requests_count_against_goodput():
    good = _row(0, ttft=0.1, e2e=0.2, out=2, itl=[0.1], prompt=10, lag=0.0)
    failed = _row(1, ttft=None, e2e=None, out=0, itl=[], prompt=10, lag=0.0, error="timeout")
    s = summarize([good, failed], duration_s=2.0, slo=parse_slo("e2e_p99=10s"))
    assert s.good_completed == 1 and s.goodput == pytest.approx(0.5)


def test_nothing_completed_gives_no_latencies_and_missed_slos():
    failed = _row(0, ttft=None, e2e=None, out=0, itl=[], prompt=10, lag=0.01, error="HTTP 503")
    s = summarize([failed], duration_s=1.0, slo=parse_slo("ttft_p99=1s,tpot_p99=1s"))
    assert s.completed == 0 and s.failed == 1
    assert s.mean_ttft_ms is None and s.p99_e2e_ms is None and s.median_itl_ms is None
    assert s.request_throughput == 0.0 and s.goodput == 0.0
    assert s.slo_met == {"ttft_p99": False, "tpot_p99": False}
    assert summarize([], duration_s=0.0).request_throughput == 0.0


def test_output_mismatch_and_cached_tokens():
    short = _row(0, ttft=0.1, e2e=0.5, out=3, itl=[0.2, 0.2], prompt=10, lag=0.0)
    short.requested_output_tokens = 8
    short.cached_tokens = 6
    exact = _row(1, ttft=0.1, e2e=0.5, out=3, itl=[0.2, 0.2], prompt=10, lag=0.0)
    s = summarize([short, exact], duration_s=1.0)
    assert s.output_token_mismatches == 1
    assert s.cached_prompt_tokens == 6
    assert summarize([exact], duration_s=1.0).cached_prompt_tokens is None


def test_clock_scale_multiplies_latencies_not_the_schedule():
    wall = RequestResult(index=7, scheduled_s=1.0, sent_s=1.25, send_lag_s=0.25, finished_s=2.0,
                         slot_wait_s=0.5, ttft_s=0.1, itl_s=[0.02, 0.03], tpot_s=0.025, e2e_s=0.15,
                         output_tokens=3)
    server = to_server_clock(wall, 10.0)
    assert (server.ttft_s, server.tpot_s, server.e2e_s) == pytest.approx((1.0, 0.25, 1.5))
    assert server.itl_s == pytest.approx([0.2, 0.3])
    assert server.slot_wait_s == pytest.approx(5.0)
    assert (server.scheduled_s, server.sent_s, server.send_lag_s, server.finished_s) == \
        (1.0, 1.25, 0.25, 2.0)
    assert wall.ttft_s == 0.1  # the wall-clock row is left alone
    assert to_server_clock(wall, 1.0) is wall


def test_wall_duration_is_first_send_to_last_completion():
    rows = [_row(0, 0.1, 0.2, 2, [0.1], 1, 0.0, sent=0.5, finished=3.0),
            _row(1, 0.1, 0.2, 2, [0.1], 1, 0.0, sent=1.0, finished=2.0),
            _row(2, None, None, 0, [], 1, 0.0, error="x", sent=2.0, finished=4.5)]
    assert wall_duration_s(rows) == pytest.approx(4.0)
    assert wall_duration_s([]) == 0.0


def test_write_results_round_trips(rows, tmp_path):
    result = BenchResult(rows=rows, summary=summarize(rows, 4.0), model="m")
    rows_csv, summary_json = write_results(result, tmp_path / "out")
    with rows_csv.open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["index"] for r in table] == ["0", "1", "2", "3"]
    assert [float(x) for x in table[1]["itl_s"].split()] == [0.2, 0.3]
    assert table[2]["tpot_s"] == "" and table[3]["error"] == "HTTP 500"
    document = json.loads(summary_json.read_text())
    assert document["completed"] == 3 and document["failed"] == 1
    assert document["p90_ttft_ms"] == pytest.approx(280)
    assert document["model"] == "m" and document["stopped_early"] is False
