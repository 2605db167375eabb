"""`/metrics` through prometheus_client's parser: label-aware aggregation, timestamps not read as values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.engines import get_engine
from tuner.engines.base import aggregate_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"

# two data-parallel engines, as vLLM exports them with --data-parallel-size 2; the gauge samples carry
# timestamps (milliseconds since the epoch), which a split on the last space would read as the value
TWO_ENGINES = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.75 1764600000000
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25 1764600000000
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 5.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:num_preemptions_total{engine="1",model_name="m"} 3.0
vllm:num_preemptions_created{engine="0",model_name="m"} 1.7646e+09
# HELP vllm:e2e_request_latency_seconds Histogram of end to end request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="m"} 4.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 5.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 3.5
vllm:e2e_request_latency_seconds_count{engine="1",model_name="m"} 1.0
vllm:e2e_request_latency_seconds_sum{engine="1",model_name="m"} 0.5
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12.0
"""


def test_gauges_are_averaged_across_label_sets_and_counters_summed():
    values = aggregate_metrics(TWO_ENGINES, "vllm:")
    assert values["kv_cache_usage_perc"] == pytest.approx(0.5)  # not 1.0 (summed), not 1.76e12 (timestamp)
    assert values["kv_cache_usage_perc_max"] == pytest.approx(0.75)
    assert values["num_requests_running"] == pytest.approx(4.0)
    assert values["num_requests_running_max"] == pytest.approx(5.0)
    assert values["num_preemptions_total"] == pytest.approx(5.0)
    assert values["e2e_request_latency_seconds_count"] == pytest.approx(6.0)
    assert values["e2e_request_latency_seconds_sum"] == pytest.approx(4.0)
    assert not any(name.endswith(("_bucket", "_created")) for name in values)
    assert not any("gc_objects" in name for name in values)  # another prefix


def test_one_engine_has_no_max_column_and_real_scrape_keeps_its_names():
    metrics = get_engine("vllm").engine_metrics((FIXTURES / "metrics-sample.txt").read_text())
    assert metrics["generation_tokens_total"] == pytest.approx(190.0)
    assert "kv_cache_usage_perc" in metrics and "kv_cache_usage_perc_max" not in metrics


def test_a_malformed_line_keeps_what_came_before_it():
    text = TWO_ENGINES.replace("# HELP vllm:num_preemptions_total", "vllm:broken{ 1\n# HELP vllm:num_preemptions_total")
    values = aggregate_metrics(text, "vllm:")
    assert values["kv_cache_usage_perc"] == pytest.approx(0.5)
