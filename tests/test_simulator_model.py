"""The simulated engine without HTTP: performance model, KV cache, scheduler, start-up failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tuner.errors import InputError
from tuner.simulator.config import (
    EngineStartupError,
    SimConfig,
    SpeculativeConfig,
    check_engine_config,
    parse_speculative_config,
    parse_token_count,
)
from tuner.simulator.engine import SimArrival, SimScheduler, simulate
from tuner.simulator.kv_cache import KVCache, PrefixHasher
from tuner.simulator.perf_model import PerfModel
from tuner.workload.prompts import token_ids_for
from tuner.workload.request import TraceRequest

REPO = Path(__file__).resolve().parents[1]
# the committed slice: the full trace's first 300 lines, unmodified
MOONCAKE = Path(__file__).resolve().parents[1] / "workloads" / "mooncake_conversation_head300.jsonl"


def closed_loop_arrivals(count: int = 256, prompt: int = 1024, output: int = 128) -> list[SimArrival]:
    return [SimArrival(0.0, prompt, output) for _ in range(count)]


def tpot(report) -> float:
    return float(np.mean([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in report.results]))


# ---- performance model ------------------------------------------------------------------------

def test_llama_8b_on_h100_matches_the_sanity_targets():
    model = PerfModel(SimConfig())
    assert 6e-3 <= model.decode_step_time(1, 1024) <= 8e-3
    # 26 ms with the constants fitted to the real H100 trials (the GEMM ramp at 256 rows; KV reads added)
    assert 15e-3 <= model.decode_step_time(256, 1100) <= 30e-3
    assert 0.15 <= model.prefill_time(8192) <= 0.3
    assert 400_000 <= model.memory_plan().capacity_tokens <= 470_000  # real vLLM 0.26: 463,264


def test_memory_knobs_move_kv_capacity_the_right_way():
    base = PerfModel(SimConfig()).memory_plan().capacity_tokens
    assert PerfModel(SimConfig(kv_cache_dtype="fp8")).memory_plan().capacity_tokens > 1.9 * base
    assert PerfModel(SimConfig(gpu_memory_utilization=0.8)).memory_plan().capacity_tokens < base
    assert PerfModel(SimConfig(quantization="fp8")).memory_plan().capacity_tokens > base  # smaller weights
    assert PerfModel(SimConfig(enforce_eager=True)).memory_plan().capacity_tokens > base  # no graph pool
    seventy_tp4 = PerfModel(SimConfig(model_shape="llama-3.1-70b", tensor_parallel_size=4)).memory_plan()
    assert seventy_tp4.capacity_tokens > 100_000


def test_step_time_knobs_trade_as_on_real_gpus():
    base = PerfModel(SimConfig())
    assert PerfModel(SimConfig(enforce_eager=True)).decode_step_time(1, 1024) > base.decode_step_time(1, 1024) * 1.2
    assert PerfModel(SimConfig(quantization="fp8")).decode_step_time(1, 1024) < base.decode_step_time(1, 1024) * 0.7
    assert PerfModel(SimConfig(attention_backend="TRITON_ATTN")).prefill_time(16384) > base.prefill_time(16384)
    assert PerfModel(SimConfig(kv_cache_dtype="fp8")).decode_step_time(256, 4096) < base.decode_step_time(256, 4096)
    seventy = SimConfig(model_shape="llama-3.1-70b", tensor_parallel_size=4)
    assert PerfModel(seventy).decode_step_time(1, 1024) < PerfModel(
        SimConfig(model_shape="llama-3.1-70b", tensor_parallel_size=2)).decode_step_time(1, 1024)


# ---- KV cache -----------------------------------------------------------------------------------

def test_prefix_hashes_follow_the_whole_prefix():
    hasher = PrefixHasher(max_len=256, block_size=16)
    a = np.arange(100, 164)
    b = a.copy()
    b[20] += 1  # differs inside block 1
    ha, hb = hasher.block_hashes(a), hasher.block_hashes(b)
    assert len(ha) == 4
    assert ha[0] == hb[0] and ha[1:] != hb[1:] and all(x != y for x, y in zip(ha[1:], hb[1:]))
    assert hasher.block_hashes(a[:40]) == ha[:2]  # partial last block is not hashed


def test_kv_cache_evicts_least_recently_freed_and_keeps_referenced_blocks():
    kv = KVCache(num_blocks=4, block_size=16)
    assert kv.allocate(2) and kv.register(11) and kv.register(12)
    kv.release(0, [11, 12])  # both cached, unreferenced; 12 (the tail) goes first
    assert kv.num_used == 0 and kv.num_evictable == 2
    assert kv.match_prefix([11, 12, 13], max_blocks=3) == (2, 2)
    kv.acquire([11])
    assert kv.allocate(3)  # 2 free + evicts 12, never the referenced 11
    assert kv.match_prefix([11, 12], max_blocks=2) == (1, 0)
    assert not kv.allocate(1)
    assert kv.num_used == 4


def test_engine_leaves_no_blocks_held_and_produces_exact_lengths():
    rng = np.random.default_rng(3)
    arrivals = [SimArrival(float(i) * 0.01, rng.integers(100, 30000, int(n)).tolist(), int(m))
                for i, (n, m) in enumerate(zip(rng.integers(1, 3000, 60), rng.integers(1, 200, 60)))]
    config = SimConfig(gpu_memory_utilization=0.26, max_model_len=4096)  # tight cache: preemptions happen
    engine = SimScheduler(config)
    pending = list(arrivals)
    done = {}
    while pending or engine.has_unfinished():
        while pending and pending[0].arrival_s <= engine.now:
            arrival = pending.pop(0)
            engine.add_request(arrival.prompt, arrival.output_tokens, user_data=arrival)
        if not engine.has_unfinished():
            engine.advance_to(pending[0].arrival_s)
            continue
        for request, _ in engine.step().produced:
            if request.finished:
                done[id(request.user_data)] = request.num_output
    assert [done[id(a)] for a in arrivals] == [a.output_tokens for a in arrivals]
    assert engine.kv.num_used == 0
    assert engine.stats.generation_tokens == sum(a.output_tokens for a in arrivals)


def test_cached_prefix_needs_no_prefill_compute():
    engine = SimScheduler(SimConfig())
    prompt = list(range(1000, 5000))
    first = engine.add_request(prompt, 1)
    while engine.has_unfinished():
        engine.step()
    start = engine.now
    second = engine.add_request(prompt, 1)
    while engine.has_unfinished():
        engine.step()
    assert first.cached_tokens == 0
    assert second.cached_tokens == 4000 - 16  # all full blocks but the last token's
    assert second.first_token_time - start < 0.2 * first.first_token_time


# ---- scheduler behaviour under load ------------------------------------------------------------

def test_more_max_num_seqs_buys_throughput_with_per_token_latency():
    """(a) Fixed arrival set, 128 clients: as on a real H100 (16 seqs -> default: 1,567 -> 3,079 tok/s),
    more concurrent sequences give more throughput and slower tokens, and shorter queueing for TTFT."""
    few = simulate(SimConfig(max_num_seqs=16), closed_loop_arrivals(), max_concurrency=128)
    many = simulate(SimConfig(max_num_seqs=128), closed_loop_arrivals(), max_concurrency=128)
    assert many.output_throughput > 1.5 * few.output_throughput
    assert tpot(many) > 1.5 * tpot(few)
    assert many.ttft_percentile(50) < few.ttft_percentile(50)
    # real: 1,567 / 3,079. The model fitted on the Mooncake trials is 11 % low on 16-sequence decodes: its
    # GEMM ramp acts as a second weight-read floor on tiny steps (see experiments/benchmarks/sim_fidelity.md)
    assert 1350 < few.output_throughput < 3200 and 1500 < many.output_throughput < 6200


def test_sustained_overload_admits_more_and_waits_longer_per_token():
    arrivals = [SimArrival(i / 40, 512, 512) for i in range(1200)]
    small = simulate(SimConfig(max_num_seqs=64), arrivals)
    large = simulate(SimConfig(max_num_seqs=512), arrivals)
    assert large.output_throughput > small.output_throughput
    assert tpot(large) > tpot(small)


def mooncake_slice(rows: int) -> list[SimArrival]:
    arrivals = []
    with MOONCAKE.open() as handle:
        for index, line in zip(range(rows), handle):
            row = json.loads(line)
            request = TraceRequest(row["timestamp"] / 1000, row["input_length"], row["output_length"],
                                   tuple(row["hash_ids"]), 512)
            arrivals.append(SimArrival(request.arrival_s, token_ids_for(request, index, vocab_size=128256),
                                       request.output_tokens))
    return arrivals


def test_prefix_caching_cuts_ttft_on_mooncake():
    """(b) Kimi conversation traffic shares its leading 512-token blocks; the cache turns them into hits."""
    arrivals = mooncake_slice(100)
    cached = simulate(SimConfig(max_model_len=131072), arrivals)
    uncached = simulate(SimConfig(max_model_len=131072, enable_prefix_caching=False), arrivals)
    assert cached.stats.prefix_hits > 0.2 * sum(len(a.prompt) for a in arrivals)
    assert uncached.stats.prefix_hits == 0
    assert cached.mean_ttft < 0.8 * uncached.mean_ttft
    assert sum(r.cached_tokens for r in cached.results) > 0


def test_small_kv_cache_preempts():
    """(c) Long decodes that outgrow the cache get preempted and recomputed; a big cache needs none."""
    arrivals = [SimArrival(0.0, 2000, 2000) for _ in range(64)]
    tight = simulate(SimConfig(gpu_memory_utilization=0.25, max_model_len=8192), arrivals)
    roomy = simulate(SimConfig(max_model_len=8192), arrivals)
    assert tight.memory.capacity_tokens < 64 * 4000 < roomy.memory.capacity_tokens
    assert tight.stats.num_preemptions > 0
    assert roomy.stats.num_preemptions == 0
    assert sum(r.num_preemptions for r in tight.results) == tight.stats.num_preemptions
    assert all(r.output_tokens == 2000 for r in tight.results)


def longest_decode_gap(config: SimConfig) -> float:
    """The longest wait between two tokens of a running decode while a 16k-token prompt arrives."""
    engine = SimScheduler(config)
    decoding = engine.add_request(512, 400)
    for _ in range(20):
        engine.step()
    engine.add_request(16000, 10)
    last, gap = engine.now, 0.0
    while not decoding.finished:
        output = engine.step()
        if any(request is decoding for request, _ in output.produced):
            gap, last = max(gap, engine.now - last), engine.now
    return gap


def test_chunked_prefill_off_stalls_decodes_behind_a_whole_prompt():
    chunked = longest_decode_gap(SimConfig())
    whole = longest_decode_gap(SimConfig(enable_chunked_prefill=False))
    assert whole > 1.5 * chunked  # one 16k-token step instead of two 8k-token chunks


def test_speculative_decoding_yields_expected_tokens_per_step():
    spec = SpeculativeConfig("eagle3", num_speculative_tokens=3, acceptance_rate=0.7)
    report = simulate(SimConfig(speculative=spec), [SimArrival(0.0, 256, 2000) for _ in range(4)])
    expected_accepted = sum(0.7**i for i in range(1, 4)) / 3  # of the drafts
    assert report.stats.accepted_tokens / report.stats.draft_tokens == pytest.approx(expected_accepted, rel=0.08)
    plain = simulate(SimConfig(), [SimArrival(0.0, 256, 2000) for _ in range(4)])
    assert tpot(report) < 0.8 * tpot(plain)  # small batch: speculation pays


def test_pipeline_parallel_needs_async_scheduling_off():
    with pytest.raises(EngineStartupError, match="Async scheduling is not supported"):
        check_engine_config(SimConfig(pipeline_parallel_size=2, async_scheduling=True).resolved())
    assert SimConfig(pipeline_parallel_size=2).resolved().async_scheduling is False


# ---- configuration ---------------------------------------------------------------------------

def test_vllm_batch_defaults_follow_gpu_memory():
    assert (SimConfig().resolved().max_num_seqs, SimConfig().resolved().max_num_batched_tokens) == (1024, 8192)
    l40s = SimConfig(gpu="l40s").resolved()
    assert (l40s.max_num_seqs, l40s.max_num_batched_tokens) == (256, 2048)
    assert SimConfig(enable_chunked_prefill=False).resolved().max_num_batched_tokens == 32768


def test_engine_config_errors_carry_vllm_messages():
    with pytest.raises(EngineStartupError, match=r"max_num_batched_tokens \(100\) must be greater than or equal to "
                                                 r"max_num_seqs \(256\)\."):
        check_engine_config(SimConfig(max_num_batched_tokens=100, max_num_seqs=256).resolved())
    with pytest.raises(EngineStartupError, match=r"Total number of attention heads \(32\) must be divisible by "
                                                 r"tensor parallel size \(3\)\."):
        check_engine_config(SimConfig(tensor_parallel_size=3).resolved())
    with pytest.raises(EngineStartupError, match="No available memory for the cache blocks"):
        SimScheduler(SimConfig(model_shape="llama-3.1-70b"))


def test_flag_values_are_checked():
    with pytest.raises(InputError, match="kv-cache-dtype"):
        SimConfig(kv_cache_dtype="int3")
    with pytest.raises(InputError, match="speculative-config"):
        parse_speculative_config('{"method": "ngram"}')
    spec = parse_speculative_config('{"method":"ngram","num_speculative_tokens":4}', acceptance_override=0.5)
    assert spec == SpeculativeConfig("ngram", 4, 0.5)
    assert parse_token_count("2K") == 2048 and parse_token_count("25.6k") == 25600


# ---- start-up failure as a process -------------------------------------------------------------

def run_sim_serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner", "sim-serve", "--startup-seconds", "0", "--port", "1", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_infeasible_memory_fails_start_up_like_vllm():
    """(d) A 70B model on one H100 cannot hold its weights and a KV cache."""
    result = run_sim_serve("--model-shape", "llama-3.1-70b")
    assert result.returncode == 1
    assert "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`" \
        in result.stdout
    assert "SIMULATED ENGINE (servetune performance model, not a GPU)" in result.stdout


def test_invalid_flag_value_is_one_line_exit_2():
    result = run_sim_serve("--gpu-memory-utilization", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "gpu-memory-utilization" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
