"""The few constants of the performance model that calibration fits from real trials.

Everything else in the model follows from the model shape and the GPU's datasheet; these say how
close real kernels get to that datasheet on one (GPU, engine version, model shape). Defaults are the
fit on all six committed H100 vLLM 0.26.0 configurations (experiments/benchmarks/sim_fidelity.md);
the CPU step overhead hides under GPU time there (async scheduling), so it keeps its prior value. No
H100 trial ran TRITON_ATTN: its KV share comes from the two H200 TRITON_ATTN configurations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from tuner.errors import InputError


@dataclass(frozen=True)
class PerfConstants:
    linear_mfu: float = 0.534  # GEMM share of peak FLOP/s once a step has many tokens
    gemm_ramp_tokens: float = 236.0  # tokens per step at which GEMMs reach half of `linear_mfu`
    attention_mfu: float = 0.80  # prefill attention share of peak FLOP/s (FlashAttention-3 on Hopper)
    kv_bw_efficiency: float = 0.90  # share of HBM bandwidth decode attention reads KV at
    step_overhead_s: float = 0.35e-3  # CPU work per step (scheduling, sampling, outputs)
    fp8_kv_speedup: float = 1.25  # attention time bf16 KV / fp8 KV (fp8 reads and fp8 tensor cores)
    # KV read bandwidth of TRITON_ATTN against FlashAttention; set from the H200 trials, not fitted
    # (calibration.FITTED): every TRITON_ATTN trial there ran fp8 KV, so a fit trades it for fp8_kv_speedup
    triton_kv_share: float = 0.12

    def with_values(self, values: dict[str, float]) -> PerfConstants:
        return replace(self, **values)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "calibration") -> PerfConstants:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown constant(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                             file=source)
        for name, value in data.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InputError(f"must be a positive number, got {value!r}", file=source, field=name)
        return cls(**{name: float(value) for name, value in data.items()})


def load_constants(path: str | Path) -> PerfConstants:
    """Constants from a calibration JSON (`{"constants": {...}}`, as `calibration.save` writes it)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg})", file=str(path), line=exc.lineno) from None
    if not isinstance(data, dict) or not isinstance(data.get("constants"), dict):
        raise InputError("expected an object with a 'constants' object", file=str(path))
    return PerfConstants.from_dict(data["constants"], source=str(path))
