"""How well a campaign used its GPUs: measuring time over GPU time held, and the schedule as a Gantt chart.

Measuring time of a trial = the replay's wall-clock (first send to last completion) × its GPUs.
GPU time held = the campaign's wall-clock (first launch to last trial recorded) × the GPUs it was given.
The finalists' re-measurements after the search are spans as well (labelled `repeat-1`, ...).
Start-up, warm-up, teardown and GPUs left idle count as held but not measuring.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TrialSpan:
    number: int
    gpus: int
    gpu_ids: tuple[str, ...]
    node_id: str
    started_at: float  # epoch seconds, on the trial's node
    ready_s: float
    measure_s: float
    ended_at: float
    ok: bool
    label: str = ""  # a finalist's re-measurement ("repeat-1", "capacity"); "" for a search trial


@dataclass
class Campaign:
    gpus: int
    started_at: float
    ended_at: float = 0.0
    spans: list[TrialSpan] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    @property
    def held_gpu_s(self) -> float:
        return self.wall_s * self.gpus

    @property
    def measuring_gpu_s(self) -> float:
        return sum(span.measure_s * span.gpus for span in self.spans)

    @property
    def in_trials_gpu_s(self) -> float:
        """GPU time inside trials (launch to teardown): what packing could not fill is held minus this."""
        return sum((span.ended_at - span.started_at) * span.gpus for span in self.spans)

    @property
    def utilisation(self) -> float:
        return self.measuring_gpu_s / self.held_gpu_s if self.held_gpu_s > 0 else 0.0

    def summary(self) -> dict:
        return {"gpus": self.gpus, "trials": sum(1 for span in self.spans if not span.label),
                "remeasurements": sum(1 for span in self.spans if span.label), "wall_s": round(self.wall_s, 2),
                "held_gpu_s": round(self.held_gpu_s, 1), "measuring_gpu_s": round(self.measuring_gpu_s, 1),
                "in_trials_gpu_s": round(self.in_trials_gpu_s, 1), "utilisation": round(self.utilisation, 4),
                "packing": round(self.in_trials_gpu_s / self.held_gpu_s, 4) if self.held_gpu_s else 0.0}

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.summary(), "started_at": self.started_at, "ended_at": self.ended_at,
                                    "spans": [asdict(span) for span in self.spans]}, indent=1) + "\n")
        return path


def with_earlier_trials(campaign: Campaign, trials: list) -> Campaign:
    """This run's campaign plus the spans that earlier runs of the study stored on their trials (user attrs
    `started_at`, `ended_at`, `ready_s`, `measure_s`, `gpu_ids`, `node`): the schedule of a resumed study
    shows every trial, from the first run's start."""
    seen = {span.number for span in campaign.spans if not span.label}
    earlier = []
    for trial in trials:
        attrs = trial.user_attrs
        if trial.number in seen or "started_at" not in attrs or "ended_at" not in attrs:
            continue
        gpus = int(attrs.get("gpus", 1))
        earlier.append(TrialSpan(number=trial.number, gpus=gpus,
                                 gpu_ids=tuple(attrs.get("gpu_ids") or (str(i) for i in range(gpus))),
                                 node_id=str(attrs.get("node", "")), started_at=float(attrs["started_at"]),
                                 ready_s=float(attrs.get("ready_s", 0.0)), measure_s=float(attrs.get("measure_s", 0.0)),
                                 ended_at=float(attrs["ended_at"]), ok=trial.state.name == "COMPLETE"))
    if not earlier:
        return campaign
    spans = sorted(earlier + campaign.spans, key=lambda span: span.started_at)
    return Campaign(gpus=campaign.gpus, started_at=min(campaign.started_at, spans[0].started_at),
                    ended_at=campaign.ended_at, spans=spans)


def gantt_png(campaign: Campaign, path: Path, title: str) -> Path | None:
    """One row per GPU (node, Ray GPU id); each trial a bar: start-up light, measuring dark, rest grey.
    None where matplotlib (the `plots` extra) is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted({span.node_id for span in campaign.spans})
    rows = sorted({(span.node_id, gpu) for span in campaign.spans for gpu in span.gpu_ids},
                  key=lambda row: (row[0], int(row[1]) if row[1].isdigit() else row[1]))
    index = {row: i for i, row in enumerate(rows)}
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * max(1, len(rows))))
    t0 = campaign.started_at
    for span in campaign.spans:
        colour = colours(span.number % 20)
        start, ready = span.started_at - t0, span.ready_s
        for gpu in span.gpu_ids:
            y = index[(span.node_id, gpu)]
            ax.broken_barh([(start, span.ended_at - span.started_at)], (y - 0.4, 0.8), facecolors="0.85")
            ax.broken_barh([(start, ready)], (y - 0.4, 0.8), facecolors=colour, alpha=0.35)
            if span.measure_s > 0:
                ax.broken_barh([(start + ready, span.measure_s)], (y - 0.4, 0.8), facecolors=colour)
            ax.text(start + ready + 0.5, y, f"#{span.number}" + (f" {span.label}" if span.label else "")
                    + ("" if span.ok else " ✗"), va="center", fontsize=7)
    node_label = {node: f"node {i}" for i, node in enumerate(nodes)}
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{node_label[node]} GPU {gpu}" if len(nodes) > 1 else f"GPU {gpu}" for node, gpu in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(campaign.wall_s, 1.0))
    ax.set_xlabel("seconds since the campaign started")
    ax.grid(axis="x", alpha=0.3)
    s = campaign.summary()
    ax.set_title(f"{title}\nutilisation {s['utilisation']:.2f} (measuring / held), GPUs inside trials "
                 f"{s['packing']:.2f}; light: start-up, dark: measuring, grey: warm-up, drain, teardown",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
