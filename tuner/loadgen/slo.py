"""Service-level objectives: `ttft_p99=800ms,tpot_p99=60ms,e2e_p90=5s`.

Each target names a latency metric, a percentile and a limit. A target is used two ways (see
`tuner.loadgen.metrics.summarize`): per request, for goodput (a request is good when its own value is
within every limit, as in `vllm bench serve --goodput`), and in aggregate (`slo_met`: the run's
percentile of the metric is within the limit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuner.errors import InputError
from tuner.metrics import PER_REQUEST_KINDS

METRICS = PER_REQUEST_KINDS
_ALIASES = {"e2el": "e2e"}
_KEY = re.compile(r"^(?P<metric>[a-z0-9]+)_p(?P<percentile>\d+(?:\.\d+)?)$")
_VALUE = re.compile(r"^(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s)?$")


@dataclass(frozen=True, slots=True)
class SloTarget:
    metric: str  # one of METRICS
    percentile: float  # 0 < p <= 100
    limit_ms: float

    @property
    def name(self) -> str:
        return f"{self.metric}_p{self.percentile:g}"


@dataclass(frozen=True, slots=True)
class SLO:
    targets: tuple[SloTarget, ...]

    def __str__(self) -> str:
        return ",".join(f"{t.name}={t.limit_ms:g}ms" for t in self.targets)


def parse_slo(text: str) -> SLO:
    """Parse `metric_pNN=LIMIT[,...]`; LIMIT in ms or s (a bare number is ms)."""
    targets: list[SloTarget] = []
    seen: set[str] = set()
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise InputError("empty SLO; expected e.g. 'ttft_p99=800ms,tpot_p99=60ms'", field="slo")
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise InputError(f"'{item}' is not 'metric_pNN=limit' (e.g. ttft_p99=800ms)", field="slo")
        match = _KEY.match(key.lower())
        if match is None:
            raise InputError(f"'{key}' is not 'metric_pNN' (e.g. ttft_p99, e2e_p90)", field=key)
        metric = _ALIASES.get(match["metric"], match["metric"])
        if metric not in METRICS:
            raise InputError(f"unknown metric '{match['metric']}'; expected one of {', '.join(METRICS)}",
                             field=key)
        percentile = float(match["percentile"])
        if not 0 < percentile <= 100:
            raise InputError(f"percentile {percentile:g} is outside (0, 100]", field=key)
        value_match = _VALUE.match(value.lower())
        if value_match is None:
            raise InputError(f"limit '{value}' is not a number with optional unit ms or s", field=key)
        limit_ms = float(value_match["number"]) * (1000.0 if value_match["unit"] == "s" else 1.0)
        if limit_ms <= 0:
            raise InputError(f"limit '{value}' must be positive", field=key)
        target = SloTarget(metric, percentile, limit_ms)
        if target.name in seen:
            raise InputError(f"'{target.name}' is given twice", field=key)
        seen.add(target.name)
        targets.append(target)
    return SLO(tuple(targets))
