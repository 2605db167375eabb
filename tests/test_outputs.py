"""What a study leaves behind: a console front that fits, an SLO column only with an SLO, offline HTML,
a PNG legend that hides no point."""

from __future__ import annotations

import re
from pathlib import Path

from tuner.records.objectives import Objectives
from tuner.records.pareto import Point, front_table
from tuner.tracking.plots import pareto_html, pareto_png

KNOBS = {"max_num_seqs": 128, "max_num_batched_tokens": 8192, "enable_prefix_caching": True,
         "gpu_memory_utilization": 0.9, "enable_chunked_prefill": True, "kv_cache_dtype": "fp8_e4m3",
         "attention_backend": "FLASH_ATTN", "cuda_graph_sizes": 512, "block_size": 32}


def _point(number: int, tok_s: float, ttft: float, tpot: float, baseline: bool = False) -> Point:
    summary = {"output_throughput": tok_s, "p99_ttft_ms": ttft, "p99_tpot_ms": tpot, "goodput": None}
    config = {k: (v if not baseline else "-") for k, v in KNOBS.items()}
    return Point(number=number, engine="vllm", config=config, summary=summary, command=["vllm", "serve"],
                 feasible=True, baseline=baseline)


POINTS = [_point(0, 900, 300, 30, baseline=True), _point(3, 1500, 450, 25), _point(5, 1200, 250, 40)]


def test_front_without_slo_has_no_slo_column_and_fits_120_columns():
    text = front_table(POINTS[1:], Objectives(), POINTS[0], list(KNOBS), slo=False)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120, text
    assert "SLO" not in lines[0] and " ok" not in text
    # the knobs moved under the table, none lost
    assert "trial 3: max_num_seqs=128" in text and "block_size=32" in text
    with_slo = front_table(POINTS[1:], Objectives(), POINTS[0], ["max_num_seqs"], slo=True)
    header = with_slo.splitlines()[0].split()
    assert header[2:4] == ["goodput", "SLO"] and header[-1] == "max_num_seqs" and " ok " in with_slo


def test_pareto_html_needs_nothing_else_and_shows_every_trial(tmp_path):
    path = pareto_html(POINTS, POINTS[1:], Objectives(), tmp_path / "pareto.html", "t")
    text = path.read_text()
    assert not re.search(r"<(script|link|img)[^>]*\b(src|href)=", text)  # nothing fetched from anywhere
    assert path.stat().st_size < 100_000
    charts = re.findall(r"<svg.*?</svg>", text, re.S)
    assert len(charts) == 2  # one per latency objective: ttft_p99, tpot_p99
    for chart in charts:
        assert chart.count('class="trial"') == 2 and chart.count('class="defaults"') == 1
        # each mark's tooltip names its trial and knobs
        assert "trial 3 (vllm)" in chart and "trial 0 (defaults) (vllm)" in chart and "max_num_seqs=128" in chart
    # the front of throughput against TTFT p99 runs through trials 5 (250 ms) and 3 (450 ms) as a step
    front = re.search(r'class="front"[^>]*points="([^"]*)"', charts[0]).group(1).split()
    assert len(front) == 3
    rows = re.findall(r"<tr><td>(\d+)", text)
    assert sorted(rows) == ["0", "3", "5"]


def test_pareto_png_legend_lies_outside_the_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        fig.canvas.draw()
        legend = fig.legends[0].get_window_extent()
        captured["overlaps"] = [legend.overlaps(ax.get_window_extent()) for ax in fig.axes]
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        path = pareto_png(POINTS, POINTS[1:], Objectives(), tmp_path / "pareto.png", "t")
    finally:
        plt.Figure.savefig = original
    assert Path(path).stat().st_size > 10_000
    assert captured["overlaps"] == [False, False]  # one axes per latency objective, none under the legend


def test_schedule_after_a_resume_shows_the_earlier_runs_trials(tmp_path):
    import optuna
    from optuna.trial import TrialState, create_trial

    from tuner.runner.campaign import Campaign, TrialSpan, gantt_png, with_earlier_trials

    def stored(number: int, start: float, ok: bool = True) -> optuna.trial.FrozenTrial:
        return create_trial(state=TrialState.COMPLETE if ok else TrialState.FAIL, values=[1.0] if ok else None,
                             user_attrs={"gpus": 1, "gpu_ids": ["0"], "node": "n", "started_at": start,
                                         "ended_at": start + 30, "ready_s": 10.0, "measure_s": 15.0})

    earlier = [stored(0, 1000.0), stored(1, 1040.0, ok=False)]
    for number, trial in enumerate(earlier):
        trial.number = number
    now = Campaign(gpus=1, started_at=2000.0, ended_at=2100.0,
                   spans=[TrialSpan(number=2, gpus=1, gpu_ids=("0",), node_id="n", started_at=2001.0, ready_s=5.0,
                                    measure_s=20.0, ended_at=2050.0, ok=True)])
    everything = with_earlier_trials(now, earlier)
    assert [s.number for s in everything.spans] == [0, 1, 2]
    assert everything.started_at == 1000.0 and everything.ended_at == 2100.0
    assert [s.ok for s in everything.spans] == [True, False, True] and everything.spans[0].ready_s == 10.0
    assert with_earlier_trials(now, []) is now
    assert gantt_png(everything, tmp_path / "schedule.png", "t").stat().st_size > 5_000


def test_a_best_of_another_engine_is_also_compared_with_its_own_engine_s_defaults():
    from collections import Counter

    from tuner.report.importance import Importances
    from tuner.report.markdown import best_vs_baseline, console_text
    from tuner.report.results import StudyResult

    def point(number: int, engine: str, tok_s: float, baseline: bool) -> Point:
        return Point(number=number, engine=engine, config={}, command=[engine, "serve"], feasible=True,
                     summary={"output_throughput": tok_s, "p99_ttft_ms": 300, "p99_tpot_ms": 30}, baseline=baseline)

    points = [point(0, "vllm", 900, True), point(1, "sglang", 1000, True), point(2, "sglang", 1500, False)]
    result = StudyResult(name="t", engines=["vllm", "sglang"], model="m", gpu="?", gpus=1, workload="w",
                         workload_digest="", objectives=Objectives(), slo=None, slo_source="none", points=points,
                         front=points[2:], baseline=points[0], best=points[2], goodput={}, issues=[],
                         rejected=Counter(), running=0)
    assert result.own_defaults() is points[1]
    table = best_vs_baseline(result)
    header = next(line for line in table.splitlines() if line.startswith("| metric"))
    assert "vllm defaults (trial 0)" in header and "sglang defaults (trial 1)" in header
    assert "best / vllm defaults" in header and "best / sglang defaults" in header
    throughput = next(line for line in table.splitlines() if line.startswith("| output_throughput"))
    assert "×1.67" in throughput and "×1.50" in throughput  # 1500 / 900 and 1500 / 1000
    assert "×1.67 vs vllm's defaults (trial 0), ×1.50 vs sglang's own (trial 1)" in console_text(
        result, Importances(target="output_throughput"))
    one_engine = StudyResult(**{**result.__dict__, "points": [points[1], points[2]], "baseline": points[1],
                                "engines": ["sglang"]})
    assert one_engine.own_defaults() is None and "best / defaults" in best_vs_baseline(one_engine)
