"""Roofline performance model of one engine replica (TP x PP GPUs): memory plan and step time.

Memory, per GPU (bytes), as vLLM plans it after profiling:
    usable      = gpu_memory x gpu_memory_utilization
    weights     = (non-embedding params x weight dtype bytes + embedding params x 2) / (TP x PP)
    activations = max_num_batched_tokens x (2 x intermediate/TP + 2 x hidden) x 2
                  + min(max_num_seqs, max_num_batched_tokens) x vocab/TP x 4       (sampler logits)
    cuda graphs = 0.1 GiB + 0.2 GiB x min(2 x max_num_seqs, 512) / 512              (0 with --enforce-eager)
    non-torch   = 0.37 GiB (+0.25 GiB NCCL buffers when TP x PP > 1)
    kv cache    = usable - weights - activations - cuda graphs - non-torch
    capacity    = floor(kv cache / (kv bytes per token per GPU x block_size)) blocks,
                  kv bytes per token per GPU = 2 x layers/PP x max(1, kv_heads/TP) x head_dim x kv dtype bytes
Calibrated so llama-3.1-8b on one H100 at 0.92 holds 463,280 tokens (real vLLM 0.26: 463,264).

Step time for a batch of T tokens (decode tokens incl. speculative ones + prefill chunk tokens); the
calibrated constants (`PerfConstants`: mfu, ramp, attention mfu, KV bandwidth, step overhead,
fp8 KV speedup, TRITON_ATTN KV share) in
brackets:
    linear  = max(2 x active linear params x T / TP / (peak x [mfu] x ramp(T) x tp_eff),
                  weight bytes touched / TP / (HBM x 0.75))
              ramp(T) = T / (T + [ramp] x ridge): GEMMs of a few hundred rows leave SMs idle (tiles,
              waves) and are partly bound by the weight reads, so a bigger token budget per step raises
              throughput; ridge = the GPU's peak / HBM bandwidth over the H100's, as [ramp] is stated
              for an H100 (an H200 leaves the bandwidth-bound regime at 0.7x the rows);
              tp_eff = 0.92 per TP doubling (smaller per-GPU GEMMs, all-reduce not overlapped with compute).
              peak is the FP8 rate for --quantization fp8 on FP8 GPUs; MoE reads only the experts the
              batch touches: expert bytes x (1 - (1 - k/E)^T), at half the dense kernels' efficiency
              (5% better with --enable-expert-parallel)
    prefill attention = max(4 x layers x heads x head_dim x (query, key) pairs / TP
                                / (bf16 peak x [attention mfu] x backend),
                            KV bytes of the chunks' context / (HBM x [kv bw] x backend KV share))
    decode attention  = KV bytes the decodes read / (HBM x [kv bw] x backend KV share), added to the prefill's:
              in a mixed batch the decodes' KV reads are not hidden under the prefill's compute.
              backend KV share: [triton kv share] for TRITON_ATTN (latency-bound, see
              `kv_read_efficiency`), else the backend's efficiency.
              fp8 KV divides both attention times by [fp8 kv speedup] (fewer bytes; FlashAttention-3
              also runs QK/PV on fp8 tensor cores), far from the 2x a byte count alone would say.
    comm    = TP > 1: 2 all-reduces per layer: 10 us + 2(TP-1)/TP x T x hidden x 2 bytes / (link x 0.7)
    gpu     = (linear + attention + comm) / PP x (1 + 0.1 (PP - 1)) + launches + draft
    launches= eager, or a batch CUDA graphs do not cover: 80 us x layers (40 us for prefill steps,
              which run piecewise graphs)
    cpu     = [step overhead] + 2 us x sequences (scheduling, sampling, output processing)
    step    = max(gpu, cpu) + 0.05 ms with async scheduling (CPU work hidden), gpu + cpu without
    draft   = speculative decoding, per step with D decoding sequences and k draft tokens:
              ngram: 0.1 ms + 3 us x D (CPU);  eagle/eagle3/draft_model: k x (fixed + fraction x linear(D))
A speculative decode verifies k+1 tokens per sequence; with acceptance rate a the expected tokens
per step are (1 - a^(k+1)) / (1 - a).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.hardware.gpus import GpuSpec, get_gpu
from tuner.simulator.config import EngineStartupError, SimConfig

GIB = 2**30
REFERENCE_GPU = get_gpu("h100")  # the GPU the ramp constant is stated for
# GEMM efficiency relative to bf16 dense (the calibrated `linear_mfu`), per weight format
QUANT_MFU_RATIO = {"none": 1.0, "fp8": 1.1, "awq": 0.9, "gptq": 0.9}
WEIGHT_BW_EFFICIENCY = 0.75
TP_EFFICIENCY_PER_DOUBLING = 0.92
ASYNC_RESIDUAL_S = 0.05e-3
PER_SEQUENCE_OVERHEAD_S = 2e-6
EAGER_OVERHEAD_PER_LAYER_S = 80e-6
ALLREDUCE_LATENCY_S = 10e-6
INTERCONNECT_EFFICIENCY = 0.7
PP_BUBBLE = 0.1
MOE_SLOWDOWN = 2.0
MAX_CUDA_GRAPH_BATCH = 512
NON_TORCH_BYTES = 0.37 * GIB
NCCL_BUFFER_BYTES = 0.25 * GIB
# (fixed seconds, fraction of the target's linear time) per draft token
DRAFT_COST = {"eagle": (0.25e-3, 0.04), "eagle3": (0.25e-3, 0.05), "draft_model": (0.35e-3, 0.15)}


def ridge_ratio(gpu: GpuSpec) -> float:
    """The GPU's FLOP-per-byte ridge point against the H100's, where `gemm_ramp_tokens` is stated: a
    GEMM of T rows does 2T FLOPs per weight read (bf16), so it leaves the bandwidth-bound regime at a
    T proportional to peak / bandwidth: fewer rows on an H200 (4.8 TB/s) than on an H100 (3.35)."""
    return (gpu.bf16_tflops / gpu.hbm_tb_s) / (REFERENCE_GPU.bf16_tflops / REFERENCE_GPU.hbm_tb_s)


def attention_efficiency(backend: str, compute_capability: tuple[int, int]) -> float:
    """Relative kernel efficiency of prefill attention (compute); `auto` picks the best for the GPU, as
    vLLM does."""
    blackwell = compute_capability >= (10, 0)
    table = {"FLASH_ATTN": 0.92 if blackwell else 1.0, "FLASHINFER": 1.0 if blackwell else 0.95,
             "TRITON_ATTN": 0.8, "FLEX_ATTENTION": 0.7}
    return 1.0 if backend == "auto" else table[backend]


def kv_read_efficiency(backend: str, compute_capability: tuple[int, int], triton_share: float) -> float:
    """Relative bandwidth at which the backend's attention reads KV (decodes, earlier chunks).

    TRITON_ATTN's is `triton_share` (`PerfConstants.triton_kv_share`): vLLM's unified Triton kernel
    walks each sequence's context in small tiles, latency-bound where FlashAttention-3 splits the KV
    and streams it with TMA. On H200 (vLLM 0.26.0, fp8 KV, chunked prefill off, experiments/h200-goodput)
    vLLM counted 1,157 steps in 46 s where the simulator schedules 1,148 steps of the same tokens, priced
    at 24 ms each with FlashAttention's bandwidth, not 40 (87 running with graphs: 21 ms, priced 8).
    Scheduling is not the gap (whole prompts per step, as vLLM; the step counts agree), nor prefill
    attention (0.2 s of the run); what grows with the running sequences' context is their KV reads."""
    if backend == "TRITON_ATTN":
        return triton_share
    return attention_efficiency(backend, compute_capability)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory split; `num_blocks` KV blocks of `block_size` tokens per replica."""

    usable_bytes: float
    weight_bytes: float
    activation_bytes: float
    cuda_graph_bytes: float
    non_torch_bytes: float
    kv_cache_bytes: float
    kv_bytes_per_token: float
    num_blocks: int
    block_size: int

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def max_concurrency(self, max_model_len: int) -> float:
        return self.capacity_tokens / max_model_len


@dataclass(slots=True)
class StepBatch:
    """What one engine step computes, summed over its sequences."""

    num_decode_seqs: int = 0
    decode_tokens: int = 0  # 1 + speculative tokens per decoding sequence
    decode_context: int = 0  # KV tokens the decodes read
    decode_pairs: int = 0  # (query, key) pairs of the decodes' attention
    prefill_tokens: int = 0
    prefill_context: int = 0  # KV tokens of earlier chunks / cached prefix the prefill chunks read
    prefill_pairs: float = 0.0
    num_prefill_seqs: int = 0
    sampled_rows: int = 0  # rows of logits computed (decode tokens + prefills that finish)
    draft_tokens: int = 0  # draft tokens proposed this step (speculative decoding)

    @property
    def total_tokens(self) -> int:
        return self.decode_tokens + self.prefill_tokens

    @property
    def num_seqs(self) -> int:
        return self.num_decode_seqs + self.num_prefill_seqs


class PerfModel:
    """Memory plan and step time of one replica for a resolved `SimConfig`."""

    def __init__(self, config: SimConfig) -> None:
        max_num_seqs = config.max_num_seqs
        if max_num_seqs is None:
            config = config.resolved()
            max_num_seqs = config.limits.max_num_seqs
        self.config = config
        shape, gpu = config.shape, config.gpu_spec
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        self.tp, self.pp = tp, pp
        d = shape.dim_per_head
        embedding_params = shape.vocab_size * shape.hidden_size * (1 if shape.tie_embeddings else 2)
        attention_params = shape.hidden_size * d * (2 * shape.num_heads + 2 * shape.num_kv_heads)
        if shape.num_experts:
            expert_params = 3 * shape.hidden_size * shape.moe_intermediate_size * shape.num_experts
            dense_layer_params = attention_params + shape.hidden_size * shape.num_experts  # + router
            active_intermediate = shape.moe_intermediate_size * shape.experts_per_token
        else:
            expert_params = 0
            dense_layer_params = attention_params + 3 * shape.hidden_size * shape.intermediate_size
            active_intermediate = shape.intermediate_size
        wbytes = config.weight_bytes_per_param
        self.lm_head_params = shape.vocab_size * shape.hidden_size
        self.dense_linear_params = shape.num_layers * dense_layer_params
        self.expert_params_total = shape.num_layers * expert_params
        self.expert_params_active = (self.expert_params_total * shape.experts_per_token / shape.num_experts
                                     if shape.num_experts else 0.0)
        self.expert_fraction_per_token = shape.experts_per_token / shape.num_experts if shape.num_experts else 0.0
        self.dense_bytes = self.dense_linear_params * wbytes
        self.expert_bytes = self.expert_params_total * wbytes
        self.lm_head_bytes = self.lm_head_params * 2.0
        self.total_weight_bytes = ((self.dense_linear_params + self.expert_params_total) * wbytes
                                   + embedding_params * 2.0)
        self.active_intermediate = active_intermediate

        k = config.constants
        fp8_compute = config.quantization == "fp8" and gpu.supports_fp8
        peak = gpu.fp8_tflops if fp8_compute else gpu.bf16_tflops
        tp_eff = TP_EFFICIENCY_PER_DOUBLING ** math.log2(tp)
        self.linear_flops_rate = peak * 1e12 * k.linear_mfu * QUANT_MFU_RATIO[config.quantization] * tp_eff
        self.ramp_tokens = k.gemm_ramp_tokens * ridge_ratio(gpu)
        self.step_overhead = k.step_overhead_s
        backend = attention_efficiency(config.attention_backend, gpu.compute_capability)
        fp8_kv = 1.0 if config.kv_cache_dtype == "auto" else k.fp8_kv_speedup
        self.attention_flops_rate = gpu.bf16_tflops * 1e12 * k.attention_mfu * backend * fp8_kv
        self.weight_bw = gpu.hbm_tb_s * 1e12 * WEIGHT_BW_EFFICIENCY
        kv_backend = kv_read_efficiency(config.attention_backend, gpu.compute_capability, k.triton_kv_share)
        self.kv_bw = gpu.hbm_tb_s * 1e12 * k.kv_bw_efficiency * kv_backend * fp8_kv
        self.attention_flops_per_pair = 4 * shape.num_layers * shape.num_heads * d / tp
        kv_heads_per_gpu = max(1.0, shape.num_kv_heads / tp)
        layers_per_stage = shape.num_layers / pp
        self.kv_bytes_per_token_gpu = 2 * layers_per_stage * kv_heads_per_gpu * d * config.kv_bytes_per_element
        # per step the whole model's KV traffic, over TP GPUs working in parallel
        self.kv_bytes_per_token_step = 2 * shape.num_layers * kv_heads_per_gpu * d * 2.0  # priced as bf16; fp8 in kv_bw
        self.hidden = shape.hidden_size
        self.num_layers = shape.num_layers
        self.interconnect_bw = gpu.interconnect_gb_s * 1e9 * INTERCONNECT_EFFICIENCY
        self.graph_max_batch = min(2 * max_num_seqs, MAX_CUDA_GRAPH_BATCH)
        self.expert_parallel = bool(config.enable_expert_parallel and shape.num_experts
                                    and tp * config.data_parallel_size > 1)

    # ---- memory -------------------------------------------------------------------------------

    def memory_plan(self) -> MemoryPlan:
        """The KV cache vLLM would allocate; raises `EngineStartupError` with vLLM's message if none fits."""
        config, shape, limits = self.config, self.config.shape, self.config.limits
        usable = config.gpu_spec.memory_bytes * config.gpu_memory_utilization
        weights = self.total_weight_bytes / (self.tp * self.pp)
        tokens = limits.max_num_batched_tokens
        activations = (tokens * (2 * self.active_intermediate / self.tp + 2 * shape.hidden_size) * 2
                       + min(limits.max_num_seqs, tokens) * shape.vocab_size / self.tp * 4)
        graphs = 0.0 if config.enforce_eager else (0.1 + 0.2 * self.graph_max_batch / MAX_CUDA_GRAPH_BATCH) * GIB
        non_torch = NON_TORCH_BYTES + (NCCL_BUFFER_BYTES if self.tp * self.pp > 1 else 0.0)
        kv_bytes = usable - weights - activations - graphs - non_torch
        block_bytes = self.kv_bytes_per_token_gpu * config.block_size
        num_blocks = int(kv_bytes // block_bytes) if kv_bytes > 0 else 0
        if num_blocks <= 0:
            raise EngineStartupError(
                "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                f"when initializing the engine. (model weights take {weights / GIB:.2f} GiB per GPU, "
                f"{usable / GIB:.2f} GiB usable at gpu_memory_utilization={config.gpu_memory_utilization})")
        plan = MemoryPlan(usable, weights, activations, graphs, non_torch, num_blocks * block_bytes,
                          self.kv_bytes_per_token_gpu, num_blocks, config.block_size)
        if plan.capacity_tokens < limits.max_model_len:
            needed = limits.max_model_len * self.kv_bytes_per_token_gpu
            raise EngineStartupError(
                f"ValueError: To serve at least one request with the model's max seq len ({config.max_model_len}), "
                f"({needed / GIB:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
                f"({plan.kv_cache_bytes / GIB:.2f} GiB). Based on the available memory, the estimated maximum "
                f"model length is {plan.capacity_tokens}. Try increasing `gpu_memory_utilization` or decreasing "
                "`max_model_len` when initializing the engine.")
        return plan

    # ---- time ---------------------------------------------------------------------------------

    def linear_time(self, tokens: int, sampled_rows: int) -> float:
        if tokens <= 0:
            return 0.0
        touched = 1.0 - (1.0 - self.expert_fraction_per_token) ** tokens if self.expert_params_total else 0.0
        flops = 2.0 * ((self.dense_linear_params + self.expert_params_active) * tokens
                       + self.lm_head_params * sampled_rows) / self.tp
        weight_bytes = (self.dense_bytes + self.expert_bytes * touched + self.lm_head_bytes) / self.tp
        ramp = tokens / (tokens + self.ramp_tokens)
        seconds = max(flops / (self.linear_flops_rate * ramp), weight_bytes / self.weight_bw)
        if self.expert_params_total:  # fused-MoE kernels reach about half the dense efficiency
            expert_share = self.expert_bytes * touched / (weight_bytes * self.tp)
            seconds *= 1.0 + expert_share * (MOE_SLOWDOWN - 1.0)
            if self.expert_parallel:
                seconds *= 0.95
        return seconds

    def step_time(self, batch: StepBatch) -> float:
        tokens = batch.total_tokens
        if tokens <= 0:
            return 0.0
        linear = self.linear_time(tokens, batch.sampled_rows)
        attention = self.prefill_attention_time(batch) + self.decode_attention_time(batch)
        comm = 0.0
        if self.tp > 1:
            ring = 2 * (self.tp - 1) / self.tp * tokens * self.hidden * 2 / self.interconnect_bw
            comm = 2 * self.num_layers * (ALLREDUCE_LATENCY_S + ring)
        gpu = linear + attention + comm
        if self.pp > 1:
            handoff = (self.pp - 1) * (ALLREDUCE_LATENCY_S + tokens * self.hidden * 2 / self.interconnect_bw)
            gpu = gpu / self.pp * (1 + PP_BUBBLE * (self.pp - 1)) + handoff
        graphs_cover = batch.num_prefill_seqs == 0 and batch.num_decode_seqs <= self.graph_max_batch
        if self.config.enforce_eager or not graphs_cover:
            # prefill steps run piecewise graphs: half the launch cost of fully eager
            per_layer = EAGER_OVERHEAD_PER_LAYER_S if self.config.enforce_eager or batch.num_prefill_seqs == 0 \
                else EAGER_OVERHEAD_PER_LAYER_S / 2
            gpu += per_layer * self.num_layers / self.pp
        gpu += self.draft_time(batch)
        cpu = self.step_overhead + PER_SEQUENCE_OVERHEAD_S * batch.num_seqs
        if self.config.async_scheduling:
            return max(gpu, cpu) + ASYNC_RESIDUAL_S
        return gpu + cpu

    def prefill_attention_time(self, batch: StepBatch) -> float:
        return self._attention_time(batch.prefill_tokens, batch.prefill_pairs, batch.prefill_context)

    def decode_attention_time(self, batch: StepBatch) -> float:
        """Decodes read their whole KV once per step: memory-bound, whatever else the batch computes."""
        return self._attention_time(batch.decode_tokens, batch.decode_pairs, batch.decode_context)

    def _attention_time(self, tokens: int, pairs: float, context: int) -> float:
        """Roofline of one kind of attention (prefill or decode), priced on its own: compute over the
        query-key pairs against reading the KV of `context + tokens` tokens."""
        if not tokens:
            return 0.0
        compute = pairs * self.attention_flops_per_pair / self.attention_flops_rate
        memory = (context + tokens) * self.kv_bytes_per_token_step / self.kv_bw
        return max(compute, memory)

    def draft_time(self, batch: StepBatch) -> float:
        spec = self.config.speculative
        if spec is None or batch.draft_tokens == 0:
            return 0.0
        if spec.method == "ngram":
            return 0.1e-3 + 3e-6 * batch.num_decode_seqs
        fixed, fraction = DRAFT_COST[spec.method]
        per_draft = fixed + fraction * self.linear_time(batch.num_decode_seqs, batch.num_decode_seqs)
        return spec.num_speculative_tokens * per_draft

    # ---- conveniences for checks and docs ------------------------------------------------------

    def decode_step_time(self, batch_size: int, context: int) -> float:
        """One plain decode step of `batch_size` sequences holding `context` tokens each."""
        return self.step_time(StepBatch(num_decode_seqs=batch_size, decode_tokens=batch_size,
                                        decode_context=batch_size * context, decode_pairs=batch_size * context,
                                        sampled_rows=batch_size))

    def prefill_time(self, tokens: int) -> float:
        """One step prefilling a fresh `tokens`-token prompt."""
        return self.step_time(StepBatch(prefill_tokens=tokens, prefill_pairs=tokens * (tokens + 1) / 2,
                                        num_prefill_seqs=1, sampled_rows=1))
