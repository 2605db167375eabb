"""SGLang's start-up, for its adapter: the log lines of each start-up phase (SGLang 0.5.17).

SGLang times its scheduler's start itself (`Engine startup timings (s): load_weight=…, kv_cache_allocation=…`)
and each CUDA-graph capture ("Capture target prefill|decode CUDA graph end. elapsed=… s"). Its prefill graphs
("breakable", 58 token counts up to the chunked-prefill size) are the longest phase of a cold start: 68.5 s of
81 s on the H200, 47 s on the H100 (experiments/h200-goodput/README.md, round 6). The scheduler process's own
start (a spawned interpreter importing SGLang and torch, 22-28 s) is printed by no line: it stays in `other`."""

from __future__ import annotations

import re

from tuner.engines.startup_phases import PhasePattern, StartupPatterns

PATTERNS = StartupPatterns(
    phases=(
        PhasePattern("model_load", re.compile(r"Load weight end\. elapsed=([\d.]+) s")),
        PhasePattern("kv_cache", re.compile(r"Engine startup timings \(s\):.*\bkv_cache_allocation=([\d.]+)")),
        PhasePattern("prefill_graphs", re.compile(r"Capture target prefill CUDA graph end\. elapsed=([\d.]+) s")),
        PhasePattern("cuda_graphs", re.compile(r"Capture target decode CUDA graph end\. elapsed=([\d.]+) s")),
    ),
    clock=re.compile(r"^\[\d{4}-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\] "),
    initialised=re.compile(r"\bmax_total_num_tokens=\d+"),
)
