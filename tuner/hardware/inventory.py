"""The GPUs of this machine through NVML (pynvml): model, memory, compute capability, NVLink peers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tuner.hardware.gpus import PRESETS


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mib: int
    compute_capability: tuple[int, int]
    nvlink_peers: tuple[int, ...] = field(default_factory=tuple)

    @property
    def preset(self) -> str | None:
        """The performance-model GPU closest to this one (h100, h200, ...), when known."""
        lowered = self.name.lower().replace(" ", "")
        for name in sorted(PRESETS, key=len, reverse=True):
            if name in lowered:
                return name
        return None


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library: a machine without NVIDIA GPUs
        return None


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bus_key(bus_id) -> str:
    """NVML writes PCI domains with 4 or 8 digits depending on the call: compare bus:device.function."""
    return ":".join(_as_text(bus_id).lower().split(":")[-2:])


def detect() -> list[GpuInfo]:
    nvml = _nvml()
    if nvml is None:
        return []
    gpus = []
    count = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    for index, handle in enumerate(handles):
        peers = []
        for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
                bus = _bus_key(nvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(handle, link).busId)
            except Exception:
                break
            for other, other_handle in enumerate(handles):
                if other != index and _bus_key(nvml.nvmlDeviceGetPciInfo(other_handle).busId) == bus:
                    peers.append(other)
        gpus.append(GpuInfo(index=index, name=_as_text(nvml.nvmlDeviceGetName(handle)),
                            memory_mib=nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
                            compute_capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),
                            nvlink_peers=tuple(sorted(set(peers)))))
    return gpus


def used_memory_mib(indices: list[int]) -> dict[int, int]:
    """Memory in use per GPU index ({} without NVML)."""
    nvml = _nvml()
    if nvml is None:
        return {}
    return {i: nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).used // 2**20 for i in indices}


def wait_memory_back(baseline: dict[int, int], timeout_s: float = 30.0, slack_mib: int = 1024) -> bool:
    """True once every GPU is back within `slack_mib` of its memory use before the trial."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = used_memory_mib(list(baseline))
        if all(now.get(i, 0) <= used + slack_mib for i, used in baseline.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
