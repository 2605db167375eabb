"""GPU specs for the performance model and the constraints (dense peak numbers, per GPU)."""

from __future__ import annotations

from dataclasses import dataclass

from tuner.errors import InputError


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    hbm_tb_s: float  # memory bandwidth, TB/s
    bf16_tflops: float  # dense
    fp8_tflops: float  # dense; 0 when the GPU has no FP8 tensor cores
    interconnect_gb_s: float  # per-direction GPU-to-GPU bandwidth (NVLink, or PCIe)
    compute_capability: tuple[int, int]

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    @property
    def supports_fp8(self) -> bool:
        return self.compute_capability >= (8, 9)


PRESETS: dict[str, GpuSpec] = {
    gpu.name: gpu
    for gpu in (
        GpuSpec("h100", 79.6, 3.35, 989.0, 1979.0, 450.0, (9, 0)),
        GpuSpec("h200", 139.8, 4.8, 989.0, 1979.0, 450.0, (9, 0)),
        GpuSpec("a100", 79.3, 2.04, 312.0, 0.0, 300.0, (8, 0)),
        GpuSpec("l40s", 44.5, 0.864, 362.0, 733.0, 32.0, (8, 9)),
        GpuSpec("b200", 178.0, 8.0, 2250.0, 4500.0, 900.0, (10, 0)),
    )
}


def get_gpu(name: str) -> GpuSpec:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise InputError(f"unknown GPU '{name}'; known: {', '.join(sorted(PRESETS))}", field="gpu") from None
