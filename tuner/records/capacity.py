"""A capacity search's result, as a trial stores it (the search itself: tuner.study.capacity)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Probe:
    rate: float
    good_fraction: float
    holds: bool


@dataclass
class CapacityResult:
    capacity_rps: float | None  # highest rate that held; None when even `low` did not
    probes: list[Probe] = field(default_factory=list)
    at_least: bool = False  # `high` itself held: the capacity may be higher

    def as_attrs(self) -> dict[str, Any]:
        return {"capacity_rps": self.capacity_rps, "at_least": self.at_least,
                "probes": [[p.rate, p.good_fraction, p.holds] for p in self.probes]}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> CapacityResult:
        return cls(attrs["capacity_rps"], [Probe(*probe) for probe in attrs["probes"]], attrs["at_least"])

    def __str__(self) -> str:
        if self.capacity_rps is None:  # no probe held: below the lowest rate probed
            return f"below {min(p.rate for p in self.probes):g} req/s"
        return f"{'>= ' if self.at_least else ''}{self.capacity_rps:.3g} req/s ({len(self.probes)} probes)"
