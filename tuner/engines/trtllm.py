"""TensorRT-LLM: `trtllm-serve` (PyTorch backend), launched as a process.

UNTESTED ON A GPU: no machine this was written on had TensorRT-LLM; flag names and options-file keys
come from its source (tensorrt_llm/commands/serve.py, llmapi/llm_args.py), not from a run.

Knobs that trtllm-serve takes as flags render as flags; the rest (KV-cache dtype, block reuse,
CUDA graphs, attention backend, speculative decoding) go to the LLM-API options file it reads with
--extra_llm_api_options (knobs with `option:` in tuner/search_spaces/trtllm.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from tuner.engines.base import Engine, Launch, ServerSpec, patterns
from tuner.engines.registry import register_engine
from tuner.errors import InputError
from tuner.outcome import Outcome
from tuner.space.knobs import SearchSpace


@register_engine("trtllm")
@dataclass
class TrtllmEngine(Engine):
    name: str = "trtllm"
    package: str = "tensorrt_llm"
    options_flag: str = "--extra_llm_api_options"
    options_name: str = "extra-llm-api-options.yaml"
    failure_patterns: list = field(default_factory=lambda: patterns(
        # NVIDIA/TensorRT-LLM#5872, #260; triton-inference-server/tensorrtllm_backend#168
        (Outcome.OOM_STARTUP, r"Executor creation failed due to insufficient GPU memory|"
                              r"CUDA runtime error in ::cudaMalloc\w*\(.*out of memory|"
                              r"must be large enough to process at least 1 sequence to completion"),
        (Outcome.OOM_LOAD, r"OutOfMemoryError|CUDA out of memory"),
        (Outcome.UNSUPPORTED, r"(Error|Exception): .*(\bnot supported\b|\bunsupported\b)"),
        # click's usage errors; pydantic's for options-file keys and values (LLM args are strict models)
        (Outcome.INVALID_CONFIG, r"Error: (No such option|Invalid value for|Got unexpected extra argument)|"
                                 r"validation errors? for|Invalid decoding type"),
    ))

    def program(self, launch: Launch) -> list[str]:
        return [launch.python, "-m", "tensorrt_llm.commands.serve", "serve"]

    def display_program(self) -> list[str]:
        return ["trtllm-serve"]

    def model_args(self, launch: Launch) -> list[str]:
        if launch.dummy_weights:
            raise InputError("the TensorRT-LLM adapter has no dummy-weight launch: give --model", field="model-shape")
        return [launch.model, "--backend", "pytorch",
                *(["--max_seq_len", str(launch.max_model_len)] if launch.max_model_len else [])]

    def connection_args(self, launch: Launch) -> list[str]:
        return ["--host", launch.host, "--port", str(launch.port)]  # no served-model-name flag, no API key

    def help_argv(self, python: str) -> list[str]:
        return [python, "-m", "tensorrt_llm.commands.serve", "serve", "--help"]

    def server_spec(self, launch: Launch, space: SearchSpace, vocab_size: int = 32000) -> ServerSpec:
        # the server names the model after a local folder's name, else the model argument as given
        path = Path(launch.model)
        return replace(super().server_spec(launch, space, vocab_size),
                       served_model_name=path.name if path.is_dir() else launch.model)

    def engine_metrics(self, prometheus_text: str) -> dict[str, float]:
        return {}  # its /metrics is JSON iteration stats, not Prometheus text
