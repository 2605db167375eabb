"""What the simulated engine serves and how: `SimConfig`, its defaults (vLLM's rules) and checks.

Two kinds of bad configuration, as with vLLM:
- a flag value that makes no sense (unknown choice, negative size): `InputError`, one line, exit 2;
- a valid flag set the engine cannot run (batch limits, TP split, memory): `EngineStartupError`
  carrying vLLM's own message, raised at start-up, exit 1, so a tuner learns the failing region.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from tuner.errors import InputError
from tuner.hardware.gpus import GpuSpec, get_gpu
from tuner.models.shapes import ModelShape, get_shape
from tuner.simulator.constants import PerfConstants

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
QUANTIZATIONS = ("none", "fp8", "awq", "gptq")
ATTENTION_BACKENDS = ("auto", "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION")
FAULTS = ("none", "crash-at-start", "oom-under-load", "hang-under-load", "crash-under-load")
# Draft-token acceptance rate per method on ordinary chat traffic (fixed table; --sim-acceptance-rate overrides).
SPEC_ACCEPTANCE = {"ngram": 0.35, "eagle": 0.6, "eagle3": 0.7, "draft_model": 0.65}
SIM_ENGINES = ("vllm", "sglang")
DEFAULT_CONTEXT_CAP = 32768  # max_model_len default: min(model's max position, this)


class EngineStartupError(Exception):
    """The engine cannot start with this configuration; the message is vLLM's, e.g. `ValueError: ...`."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    acceptance_rate: float


@dataclass(frozen=True)
class BatchLimits:
    """The limits of a `resolved()` SimConfig, none of them `None`."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class SimConfig:
    """Everything `tune sim-serve` takes. `None` fields get vLLM's defaults in `resolved()`."""

    model_shape: str = "llama-3.1-8b"
    gpu: str = "h100"
    served_model_name: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.92
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    kv_cache_dtype: str = "auto"
    quantization: str = "none"
    speculative: SpeculativeConfig | None = None
    attention_backend: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool | None = None  # None: on unless pipeline parallel (vLLM's auto)
    block_size: int = 16
    max_model_len: int | None = None
    time_scale: float = 1.0
    startup_seconds: float = 20.0
    seed: int = 0
    fault: str = "none"
    fault_after_requests: int = 20
    engine: str = "vllm"  # the engine whose scheduler is simulated: vllm or sglang
    engine_version: str | None = None  # for the unsupported-combination table; None: the newest known
    constants: PerfConstants = PerfConstants()
    shape: ModelShape = field(init=False, repr=False, compare=False)
    gpu_spec: GpuSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", get_shape(self.model_shape))
        object.__setattr__(self, "gpu_spec", get_gpu(self.gpu))
        _check_choice(self.kv_cache_dtype, KV_CACHE_DTYPES, "kv-cache-dtype")
        _check_choice(self.quantization, QUANTIZATIONS, "quantization")
        _check_choice(self.attention_backend, ATTENTION_BACKENDS, "attention-backend")
        _check_choice(self.fault, FAULTS, "fault")
        _check_choice(self.engine, SIM_ENGINES, "sim-engine")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "block_size"):
            _check_positive(getattr(self, name), name)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) is not None:
                _check_positive(getattr(self, name), name)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InputError(f"must be in (0, 1], got {self.gpu_memory_utilization}", field="gpu-memory-utilization")
        if not self.time_scale > 0:
            raise InputError(f"must be > 0, got {self.time_scale}", field="time-scale")
        if self.startup_seconds < 0:
            raise InputError(f"must be >= 0, got {self.startup_seconds}", field="startup-seconds")
        if self.fault_after_requests < 0:
            raise InputError(f"must be >= 0, got {self.fault_after_requests}", field="fault-after-requests")
        if not 0 < self.port < 65536:
            raise InputError(f"must be in 1..65535, got {self.port}", field="port")

    @property
    def weight_bytes_per_param(self) -> float:
        return {"none": 2.0, "fp8": 1.0, "awq": 0.53, "gptq": 0.53}[self.quantization]  # int4 + group scales

    @property
    def kv_bytes_per_element(self) -> float:
        return 2.0 if self.kv_cache_dtype == "auto" else 1.0

    @property
    def limits(self) -> BatchLimits:
        """The batch and length limits; the config must be `resolved()`."""
        seqs, tokens, length = self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len
        if seqs is None or tokens is None or length is None:
            raise ValueError("SimConfig.limits needs a resolved() config")
        return BatchLimits(seqs, tokens, length)

    def resolved(self) -> SimConfig:
        """This config with vLLM's hardware-dependent defaults filled in."""
        seqs, tokens = default_batch_limits(self.gpu_spec)
        max_model_len = self.max_model_len or min(self.shape.max_position, DEFAULT_CONTEXT_CAP)
        max_num_seqs = self.max_num_seqs or seqs
        if self.max_num_batched_tokens is not None:
            batched = self.max_num_batched_tokens
        elif self.enable_chunked_prefill:
            batched = tokens
        else:  # vLLM: without chunked prefill a whole prompt must fit one step
            batched = max(max_model_len, tokens)
        async_scheduling = self.pipeline_parallel_size == 1 if self.async_scheduling is None else self.async_scheduling
        return replace(self, max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
                       max_model_len=max_model_len, async_scheduling=async_scheduling,
                       served_model_name=self.served_model_name or (self.model_shape,))


def default_batch_limits(gpu: GpuSpec) -> tuple[int, int]:
    """vLLM's `get_batch_defaults` for `vllm serve`: (max_num_seqs, max_num_batched_tokens)."""
    if gpu.memory_gib >= 160:
        return 1024, 16384
    if gpu.memory_gib >= 70 and gpu.name != "a100":
        return 1024, 8192
    return 256, 2048


def check_engine_config(config: SimConfig) -> None:
    """vLLM's config-time validation, with its messages. `config` must be resolved. The combinations an
    engine version refuses are `tuner.simulator.support.check_engine`'s, which calls this."""
    shape, limits = config.shape, config.limits
    if limits.max_num_batched_tokens < limits.max_num_seqs:
        raise EngineStartupError(
            f"ValueError: max_num_batched_tokens ({config.max_num_batched_tokens}) must be greater than "
            f"or equal to max_num_seqs ({config.max_num_seqs}).")
    if shape.num_heads % config.tensor_parallel_size:
        raise EngineStartupError(
            f"ValueError: Total number of attention heads ({shape.num_heads}) must be divisible by "
            f"tensor parallel size ({config.tensor_parallel_size}).")
    if config.pipeline_parallel_size > shape.num_layers:
        raise EngineStartupError(
            f"ValueError: pipeline parallel size ({config.pipeline_parallel_size}) must not exceed the "
            f"number of hidden layers ({shape.num_layers}).")
    if config.async_scheduling and config.pipeline_parallel_size > 1:
        raise EngineStartupError("ValueError: Async scheduling is not supported by the V1 model runner with "
                                 "pipeline parallelism. Please disable async scheduling.")
    if limits.max_model_len > shape.max_position:
        raise EngineStartupError(
            f"ValueError: User-specified max_model_len ({config.max_model_len}) is greater than the derived "
            f"max_model_len (max_position_embeddings={shape.max_position} in model's config.json).")
    if not config.enable_chunked_prefill and limits.max_num_batched_tokens < limits.max_model_len:
        raise EngineStartupError(
            f"ValueError: max_num_batched_tokens ({config.max_num_batched_tokens}) is smaller than "
            f"max_model_len ({config.max_model_len}). This effectively limits the maximum sequence length to "
            f"max_num_batched_tokens and makes vLLM reject longer sequences. Please increase "
            f"max_num_batched_tokens or decrease max_model_len.")


def parse_speculative_config(text: str | None, acceptance_override: float | None = None) -> SpeculativeConfig | None:
    """`--speculative-config` JSON, e.g. `{"method":"ngram","num_speculative_tokens":4}`."""
    if acceptance_override is not None and not 0 <= acceptance_override < 1:
        raise InputError(f"must be in [0, 1), got {acceptance_override}", field="sim-acceptance-rate")
    if text is None or text.strip() in ("", "null", "{}"):
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at column {exc.colno})", field="speculative-config") from None
    if not isinstance(spec, dict):
        raise InputError("must be a JSON object", field="speculative-config")
    method = spec.get("method")
    if method is None and spec.get("model"):
        model = str(spec["model"]).lower()
        method = "eagle3" if "eagle3" in model else "eagle" if "eagle" in model else "draft_model"
    if method not in SPEC_ACCEPTANCE:
        raise InputError(f"method {method!r} is not simulated; known: {', '.join(SPEC_ACCEPTANCE)}",
                         field="speculative-config")
    tokens = spec.get("num_speculative_tokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= 32:
        raise InputError(f"num_speculative_tokens must be an integer in 1..32, got {tokens!r}",
                         field="speculative-config")
    rate = SPEC_ACCEPTANCE[method] if acceptance_override is None else acceptance_override
    return SpeculativeConfig(method=method, num_speculative_tokens=tokens, acceptance_rate=rate)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_token_count(text: str) -> int:
    """An int, or vLLM's human-readable form: `25.6k` = 25,600 (decimal), `2K` = 2,048 (binary)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid token count {text!r}")
    number, suffix = match.groups()
    value = float(number) * _MULTIPLIERS[suffix]
    if value != int(value):
        raise ValueError(f"invalid token count {text!r}")
    return int(value)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise InputError(f"invalid choice {value!r}; choose from {', '.join(choices)}", field=name)


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"must be a positive integer, got {value!r}", field=name.replace("_", "-"))
