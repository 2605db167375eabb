"""Known constraints, checked before anything launches. Each violation comes with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.hardware.gpus import GpuSpec
from tuner.models.shapes import ModelShape


@dataclass(frozen=True)
class Context:
    gpus: int
    gpu: GpuSpec | None = None
    model: ModelShape | None = None
    max_model_len: int | None = None


def gpus_needed(config: dict[str, Any]) -> int:
    return (int(config.get("tensor_parallel_size", 1)) * int(config.get("pipeline_parallel_size", 1))
            * int(config.get("data_parallel_size", 1)))


def violations(config: dict[str, Any], ctx: Context) -> list[str]:
    reasons: list[str] = []
    tp = int(config.get("tensor_parallel_size", 1))
    if gpus_needed(config) > ctx.gpus:
        reasons.append(f"TP×PP×DP = {gpus_needed(config)} exceeds the {ctx.gpus} GPUs given")
    if ctx.model is not None:
        if ctx.model.num_heads % tp:
            reasons.append(f"{ctx.model.num_heads} attention heads are not divisible by TP={tp}")
        if config.get("pipeline_parallel_size", 1) > ctx.model.num_layers:
            reasons.append(f"PP={config['pipeline_parallel_size']} exceeds {ctx.model.num_layers} layers")
        if config.get("enable_expert_parallel") and not ctx.model.num_experts:
            reasons.append("expert parallelism needs a mixture-of-experts model")
    seqs, budget = config.get("max_num_seqs"), config.get("max_num_batched_tokens")
    if seqs is not None and budget is not None and budget < seqs:
        reasons.append(f"batched-token budget {budget} < max running requests {seqs}")
    if (config.get("enable_chunked_prefill") is False and budget is not None and ctx.max_model_len
            and budget < ctx.max_model_len):
        reasons.append(f"chunked prefill off needs a token budget >= max model length {ctx.max_model_len}")
    if ctx.gpu is not None and not ctx.gpu.supports_fp8:
        for knob in ("quantization", "kv_cache_dtype"):
            if str(config.get(knob, "")).startswith("fp8"):
                reasons.append(f"{knob}={config[knob]} needs FP8 (compute capability >= 8.9); "
                               f"{ctx.gpu.name} has {ctx.gpu.compute_capability[0]}.{ctx.gpu.compute_capability[1]}")
    return reasons
