"""Workload statistics against hand-computed values, and against the published trace figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tuner.workload.analysis import analyze, format_stats
from tuner.workload.formats import read_trace
from tuner.workload.request import TraceRequest

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = REPO / "workloads"
SHARED_TRACES = REPO.parent / "shared" / "traces"  # the full traces, beside the checkout (not committed)


def handmade() -> list[TraceRequest]:
    # 4-token blocks so that reuse is easy to count by hand
    return [
        TraceRequest(0.0, 10, 5, prefix_blocks=(1, 2, 3), block_tokens=4, session_id="a"),
        TraceRequest(0.5, 8, 7, prefix_blocks=(1, 2), block_tokens=4, session_id="b",
                     prompt="some text"),
        TraceRequest(2.0, 6, 1, prefix_blocks=(1, 4), block_tokens=4, session_id="a"),
        TraceRequest(4.0, 2, 3, prefix_blocks=(3,), block_tokens=4),
    ]


def test_handmade_trace_numbers():
    stats = analyze(iter(handmade()))  # a one-shot iterator is enough
    assert stats.rows == 4
    assert stats.span_s == 4.0
    assert stats.mean_rate_rps == 1.0
    # gaps 0.5, 1.5, 2.0: mean 4/3, population variance 7/18
    assert stats.interarrival_cv == pytest.approx(math.sqrt(7 / 18) / (4 / 3))
    # counts in 1 s bins [0,1) .. [4,5): 2, 0, 1, 0, 1 -> mean 0.8, variance 0.56
    assert stats.dispersion_1s == pytest.approx(0.56 / 0.8)
    inputs = stats.input_tokens  # 2, 6, 8, 10
    assert (inputs.mean, inputs.p50, inputs.max) == (6.5, 7.0, 10)
    assert inputs.p90 == pytest.approx(9.4) and inputs.p99 == pytest.approx(9.94)
    outputs = stats.output_tokens  # 1, 3, 5, 7
    assert (outputs.mean, outputs.p50, outputs.max) == (4.0, 4.0, 7)
    prefix = stats.prefix
    assert (prefix.blocks_total, prefix.blocks_unique) == (8, 4)
    assert prefix.block_reuse == 0.5
    # reused: request 2 blocks 1, 2 (4 + 4), request 3 block 1 (4), request 4 block 3, whose 2 input
    # tokens fill only half of it (2): 14 of 26 input tokens
    assert prefix.token_reuse == pytest.approx(14 / 26)
    assert stats.sessions == 2
    assert stats.requests_with_text == 1


def test_degenerate_traces():
    one = analyze([TraceRequest(3.0, 5, 5)])
    assert (one.rows, one.span_s, one.mean_rate_rps) == (1, 0.0, None)
    assert one.interarrival_cv is None and one.dispersion_1s is None
    assert one.prefix is None and one.sessions is None
    same_instant = analyze([TraceRequest(1.0, 5, 5), TraceRequest(1.0, 7, 5)])
    assert same_instant.interarrival_cv is None and same_instant.dispersion_1s == 0.0
    with pytest.raises(ValueError):
        analyze([])


def test_unsigned_64_bit_block_ids_stay_distinct():
    huge = 2**64 - 1  # unsigned 64-bit hashes, as some tools write them
    stats = analyze([TraceRequest(0.0, 12, 1, prefix_blocks=(huge, 2**63, 5), block_tokens=4),
                     TraceRequest(1.0, 12, 1, prefix_blocks=(huge, 2**63 - 1, 5), block_tokens=4)])
    assert (stats.prefix.blocks_total, stats.prefix.blocks_unique) == (6, 4)


def test_format_stats_shows_the_numbers():
    text = format_stats(analyze(handmade()))
    assert "requests               4" in text
    assert "1.00 req/s" in text
    assert "p50 7  p90 9  p99 10  max 10" in text
    assert "50.0% of blocks repeat an earlier block; 53.8% of input tokens" in text
    assert "8 total, 4 distinct" in text


def test_slice_numbers():
    stats = analyze(read_trace(WORKLOADS / "mooncake_conversation_head300.jsonl"))
    assert (stats.rows, stats.span_s) == (300, 102.0)
    assert stats.input_tokens.max == 120_633 and stats.output_tokens.max == 2_000
    assert (stats.prefix.blocks_total, stats.prefix.blocks_unique) == (8_490, 7_814)


@pytest.mark.skipif(not SHARED_TRACES.is_dir(), reason=f"the full traces are not in {SHARED_TRACES}")
def test_full_traces_match_published_figures():
    mooncake = analyze(read_trace(SHARED_TRACES / "mooncake_conversation_trace.jsonl"))
    assert mooncake.rows == 12_031 and round(mooncake.span_s) == 3_537
    assert round(mooncake.mean_rate_rps, 2) == 3.40
    assert (mooncake.input_tokens.p50, mooncake.input_tokens.p90) == (6_909, 27_367)
    assert round(mooncake.input_tokens.p99) == 85_400 and mooncake.input_tokens.max == 126_195
    assert round(mooncake.output_tokens.mean, 1) == 342.6 and round(mooncake.output_tokens.p99) == 1_119
    assert (mooncake.prefix.blocks_total, mooncake.prefix.blocks_unique) == (288_500, 182_790)
    assert round(100 * mooncake.prefix.block_reuse, 1) == 36.6
    assert round(100 * mooncake.prefix.token_reuse, 1) == 37.4
    assert round(mooncake.dispersion_1s, 1) == 7.9
    azure = analyze(read_trace(SHARED_TRACES / "AzureLLMInferenceTrace_conv.csv"))
    assert azure.rows == 19_366 and round(azure.span_s, 1) == 3_501.7
    assert round(azure.input_tokens.mean, 1) == 1_154.7 and azure.input_tokens.p50 == 1_020
    assert round(azure.output_tokens.mean, 1) == 211.1 and azure.output_tokens.max == 1_000
    assert round(azure.interarrival_cv, 2) == 1.09 and round(azure.dispersion_1s, 2) == 1.39
    assert azure.prefix is None
