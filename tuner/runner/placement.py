"""Where a trial runs: its node and GPUs, and an NVLink-aware order of those GPUs for tensor parallelism.

Ray picks which GPUs of a node a trial gets. Inside the trial actor we then order them so that each
consecutive group of TP GPUs (vLLM and SGLang put a TP group on consecutive visible devices, and DP
ranks / PP stages on the next groups) is joined by NVLink where the assigned set allows it, and
record whether it is. GPU ids are Ray's, which are NVML indices when Ray was started without a
CUDA_VISIBLE_DEVICES of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    node_id: str
    gpu_ids: tuple[str, ...]  # as Ray names them
    cuda_visible_devices: str
    nvlink: bool | None = None  # every TP group joined by NVLink; None: no NVML or TP = 1


def nvlink_order(gpu_ids: list[int], peers: dict[int, set[int]], tp: int) -> tuple[list[int], bool]:
    """The GPUs ordered so that each run of `tp` is an NVLink clique where possible, and whether all are."""
    remaining = sorted(gpu_ids)
    ordered: list[int] = []
    all_joined = True
    while remaining:
        group = [remaining.pop(0)]
        for gpu in list(remaining):
            if len(group) == tp:
                break
            if all(gpu in peers.get(member, set()) for member in group):
                group.append(gpu)
                remaining.remove(gpu)
        if len(group) < tp:
            all_joined = False
            while remaining and len(group) < tp:
                group.append(remaining.pop(0))
        ordered += group
    return ordered, all_joined


def nvlink_peers() -> dict[int, set[int]]:
    """NVLink peers of each GPU of this machine by NVML index ({} without NVML)."""
    from tuner.hardware.inventory import detect

    return {gpu.index: set(gpu.nvlink_peers) for gpu in detect()}
