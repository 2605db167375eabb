"""Model shapes: the numbers that decide serving cost (no weights needed)."""

from __future__ import annotations

from dataclasses import dataclass

from tuner.errors import InputError

DTYPE_BYTES = {"bfloat16": 2.0, "float16": 2.0, "auto": 2.0, "fp8": 1.0, "fp8_e4m3": 1.0,
               "fp8_e5m2": 1.0, "int8": 1.0, "int4": 0.5, "awq": 0.5, "gptq": 0.5}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    num_experts: int = 0  # 0 -> dense
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    tie_embeddings: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def _attention_params(self) -> int:
        d = self.dim_per_head
        return self.hidden_size * d * (2 * self.num_heads + 2 * self.num_kv_heads)

    def _mlp_params(self, active: bool) -> int:
        if not self.num_experts:
            return 3 * self.hidden_size * self.intermediate_size
        experts = self.experts_per_token if active else self.num_experts
        return 3 * self.hidden_size * self.moe_intermediate_size * experts + self.hidden_size * self.num_experts

    def _params(self, active: bool) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * (self._attention_params() + self._mlp_params(active)) + embeddings

    @property
    def params(self) -> int:
        """All weights (what must fit in memory)."""
        return self._params(active=False)

    @property
    def active_params(self) -> int:
        """Weights touched per token (what costs FLOPs)."""
        return self._params(active=True)

    def kv_bytes_per_token(self, kv_dtype: str = "auto") -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.dim_per_head * dtype_bytes(kv_dtype)


def dtype_bytes(dtype: str | None) -> float:
    return DTYPE_BYTES.get((dtype or "auto").lower(), 2.0)


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, 131072),
        ModelShape("llama-3.1-70b", 8192, 28672, 80, 64, 8, 128256, 131072),
        ModelShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, 131072, tie_embeddings=True),
        ModelShape("qwen3-30b-a3b", 2048, 6144, 48, 32, 4, 151936, 40960, head_dim=128,
                   num_experts=128, experts_per_token=8, moe_intermediate_size=768,
                   architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe"),
        # tiny shape that real vLLM serves on a 2-core CPU in seconds (tests, CI)
        ModelShape("tiny-llama", 128, 256, 2, 4, 4, 512, 4096),
    )
}


def get_shape(name: str) -> ModelShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown model shape '{name}'; known: {', '.join(sorted(PRESETS))}",
                         field="model-shape") from None
