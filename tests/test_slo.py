from __future__ import annotations

import argparse

import pytest

from tuner.errors import InputError
from tuner.loadgen.cli import add_arguments, run
from tuner.loadgen.slo import SloTarget, parse_slo


def test_parses_targets_with_units():
    slo = parse_slo("ttft_p99=800ms,tpot_p99=60ms,e2e_p90=5s")
    assert slo.targets == (SloTarget("ttft", 99, 800.0), SloTarget("tpot", 99, 60.0),
                           SloTarget("e2e", 90, 5000.0))
    assert [t.name for t in slo.targets] == ["ttft_p99", "tpot_p99", "e2e_p90"]


def test_bare_number_is_ms_and_spaces_case_fractional_percentile():
    slo = parse_slo(" TTFT_P50 = 250 , e2el_p99.9=1.5s ")
    assert slo.targets == (SloTarget("ttft", 50, 250.0), SloTarget("e2e", 99.9, 1500.0))
    assert str(slo) == "ttft_p50=250ms,e2e_p99.9=1500ms"


def test_round_trip_through_str():
    slo = parse_slo("ttft_p99=0.8s,tpot_p90=60")
    assert parse_slo(str(slo)) == slo


@pytest.mark.parametrize("text, field, fragment", [
    ("", "slo", "empty"),
    ("ttft=800ms", "ttft", "metric_pNN"),
    ("ttft_p99", "slo", "metric_pNN=limit"),
    ("ttft_p99=", "slo", "metric_pNN=limit"),
    ("foo_p99=10ms", "foo_p99", "unknown metric 'foo'"),
    ("itl_p99=10ms", "itl_p99", "unknown metric"),
    ("ttft_p0=10ms", "ttft_p0", "outside"),
    ("ttft_p101=10ms", "ttft_p101", "outside"),
    ("ttft_p99=fast", "ttft_p99", "not a number"),
    ("ttft_p99=10us", "ttft_p99", "not a number"),
    ("ttft_p99=-5ms", "ttft_p99", "not a number"),
    ("ttft_p99=0", "ttft_p99", "positive"),
    ("ttft_p99=1s,ttft_p99=2s", "ttft_p99", "twice"),
])
def test_bad_text_names_the_field(text, field, fragment):
    with pytest.raises(InputError) as caught:
        parse_slo(text)
    assert caught.value.field == field
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bench_command_rejects_bad_slo_before_reading_the_workload(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--url", "http://127.0.0.1:9", "--workload",
                              str(tmp_path / "missing.jsonl"), "--slo", "ttft_p99=soon"])
    with pytest.raises(InputError) as caught:
        run(args)
    assert caught.value.field == "ttft_p99" and "soon" in str(caught.value)
