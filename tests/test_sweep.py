"""`tune sweep`: a tiny simulated sweep run twice, compared, then a doctored earlier run makes it a regression."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.report.hypervolume import hypervolume_2d
from tuner.sweep.spec import load_spec

WORKLOAD = Path(__file__).parents[1] / "workloads" / "mooncake_conversation_head300.jsonl"
SPECS = Path(__file__).parents[1] / "experiments" / "sweeps"

# noise thresholds of 90%: ten-request replays on a shared 2-core machine are noisy, and this test is
# about the comparison's arithmetic and exit code, not about the simulator's repeatability
TINY = f"""\
name: tiny
trials: 2
slo: ttft_p99=60s
sim_time_scale: 40
seed: 3
mlflow_uri: none
noise_threshold: 0.9
noise_floor: 0.9
matrix:
  model_shapes: [llama-3.2-1b]
  workloads:
    - {{path: {WORKLOAD}, name: head10, rows: 10, time_scale: 3}}
  engines: [sim]
  gpu: [h100]
"""


def _runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


@pytest.mark.slow
def test_sweep_twice_then_a_regression(tmp_path, capsys, local_ray):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out, work = tmp_path / "out", tmp_path / "work"
    sweep = ["sweep", str(spec), "--out", str(out), "--work", str(work)]

    assert main([*sweep, "--repeats", "2"]) == 0
    first, = _runs(out)
    cell = first["cells"][0]
    assert cell["id"] == "llama-3.2-1b-head10-sim-h100-x1" and cell["status"] == "ok" and cell["simulated"]
    assert cell["study"] == f"tiny-{cell['id']}-{first['run_id']}"
    # a trial may fail (and is then counted as failed); the figures come from those that completed
    assert cell["trials_completed"] >= 1 and cell["trials_completed"] + cell["trials_failed"] == 2
    assert cell["reference"] == [0.0, 60000.0]
    assert cell["hypervolume"] == pytest.approx(hypervolume_2d([tuple(p) for p in cell["front"]], (0.0, 60000.0)))
    assert 1 <= len(cell["repeats"]) <= 2
    samples = [*cell["repeats"],
               {"output_throughput": cell["baseline_throughput"], "goodput": cell["baseline_goodput"]}]
    series = [[s[m] for s in samples if s[m] is not None] for m in ("output_throughput", "goodput")]
    cv = max(statistics.stdev(v) / statistics.fmean(v) for v in series)
    assert cell["noise_cv"] == pytest.approx(cv)
    assert first["learned_threshold"] == pytest.approx(3 * cv)
    assert first["noise_threshold"] == pytest.approx(max(3 * cv, 0.9))
    assert first["comparisons"][0]["previous_run"] is None and not first["regression"]
    assert (out / "runs" / first["run_id"] / "fronts.png").stat().st_size > 1000
    assert Path(cell["report"]).exists()
    capsys.readouterr()

    code = main(sweep)
    summary = capsys.readouterr().out
    first, second = _runs(out)
    assert f"the repeats of run {first['run_id']}" in second["noise_source"]
    threshold = second["noise_threshold"]
    assert threshold == pytest.approx(max(first["learned_threshold"], 0.9))
    comparison, = second["comparisons"]
    assert comparison["previous_run"] == first["run_id"]
    changes = {c["name"]: c for c in comparison["changes"]}
    now, before = second["cells"][0], first["cells"][0]
    assert set(changes) == {"best_goodput", "hypervolume"} | (
        {"baseline_throughput"} if before["baseline_throughput"] else set())
    assert changes["best_goodput"]["change"] == pytest.approx(now["best_goodput"] / before["best_goodput"] - 1)
    if now["baseline_throughput"] and before["baseline_throughput"]:
        assert changes["baseline_throughput"]["change"] == pytest.approx(
            now["baseline_throughput"] / before["baseline_throughput"] - 1)
    assert changes["hypervolume"]["old"] == pytest.approx(before["hypervolume"])
    # Whether two real runs differ by more than the threshold is the simulator's noise: on a loaded 2-core
    # machine a ten-request replay at 40x can measure 20x less goodput (its clock falls behind). That the
    # verdict, the exit code and the summary follow from the changes and the threshold does not depend on it.
    for change in changes.values():
        assert change["regressed"] == (change["old"] > 0 if change["new"] is None else
                                       change["change"] is not None and change["change"] < -threshold), change
    regressed = any(c["regressed"] for c in changes.values())
    assert comparison["regressed"] == second["regression"] == regressed and code == (3 if regressed else 0)
    assert ("**REGRESSION** in 1 of 1" if regressed else "**No regression** in 1 compared cell(s)") in summary
    assert (out / "latest.md").read_text() in summary

    # the earlier run, doctored to have measured what the latest did, with quiet repeats: the spec's floor
    # is the threshold, and nothing changed (exit 0)
    doctored = out / "runs" / f"{first['run_id']}.json"
    data = json.loads(doctored.read_text())
    data["learned_threshold"] = 0.03
    cell = data["cells"][0]
    cell.update({key: now[key] for key in ("best_goodput", "front", "baseline_throughput", "first_latency")},
                reference=[0.0, 2 * max(latency for _, latency in now["front"])])  # every point counts
    doctored.write_text(json.dumps(data))
    compare_only = ["sweep", str(spec), "--out", str(out), "--compare-only"]
    assert main(compare_only) == 0
    summary = capsys.readouterr().out
    assert ("**No regression** in 1 compared cell(s). Noise threshold 90.0%: the spec's floor "
            f"(3 × CV from the repeats of run {first['run_id']} is 3.0%)") in summary
    changes = {c["name"]: c for c in _runs(out)[-1]["comparisons"][0]["changes"]}
    assert all(c["change"] == 0 and not c["regressed"] for c in changes.values()), changes

    # ... and 100× better than the latest: the latest is now a regression (exit 3)
    cell["best_goodput"] *= 100
    cell["front"] = [[t * 100, lat] for t, lat in cell["front"]]
    doctored.write_text(json.dumps(data))
    assert main(compare_only) == 3
    summary = capsys.readouterr().out
    assert "**REGRESSION** in 1 of 1 compared cell(s)" in summary and "⚠" in summary
    latest = _runs(out)[-1]
    assert latest["run_id"] == second["run_id"] and latest["regression"] is True
    changes = {c["name"]: c for c in latest["comparisons"][0]["changes"]}
    assert [name for name, c in changes.items() if c["regressed"]] == ["best_goodput", "hypervolume"]
    assert changes["best_goodput"]["change"] == pytest.approx(-0.99)
    reference = tuple(cell["reference"])
    assert changes["hypervolume"]["change"] == pytest.approx(-0.99)
    assert changes["hypervolume"]["change"] == pytest.approx(
        hypervolume_2d([tuple(p) for p in now["front"]], reference)
        / hypervolume_2d([tuple(p) for p in cell["front"]], reference) - 1)
    assert "| regression: best_goodput -99.0%, hypervolume -99.0% |" in summary


@pytest.mark.parametrize("edit, field", [
    (("trials: 2", "trails: 2"), "trails"),
    (("engines: [sim]", "engines: [sim, vlm]"), "matrix.engines[1]"),
    (("rows: 10", "rows: ten"), "matrix.workloads[0].rows"),
    (("gpu: [h100]", "gpu: [h900]"), "matrix.gpu[0]"),
    (("slo: ttft_p99=60s", "slo: ttft_p99=fast"), "slo"),
])
def test_bad_spec_is_one_line_naming_the_key(tmp_path, capsys, edit, field):
    spec = tmp_path / "bad.yaml"
    text = TINY.replace(*edit)
    spec.write_text(text)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    line = next(i for i, row in enumerate(text.splitlines(), 1) if edit[1].split(":")[0].strip() in row)
    assert len(err.splitlines()) == 1 and err.startswith(f"tune: error: {spec}:{line}: field '{field}'"), err
    assert not (tmp_path / "out").exists()


def test_shipped_specs_load():
    sim = load_spec(SPECS / "nightly-sim.yaml")
    assert len(sim.cells) == 2 and {c.engine for c in sim.cells} == {"sim"}
    gpu = load_spec(SPECS / "nightly-gpu.yaml")
    assert {(c.engine, c.gpu) for c in gpu.cells} == {("vllm", "h100"), ("vllm", "h200"), ("sglang", "h100"),
                                                       ("sglang", "h200")}


def test_hypervolume_threshold_and_a_cell_that_stopped_working():
    from tuner.sweep.compare import choose_threshold, compare_run
    from tuner.sweep.results import CellResult, RunResults

    # (5 tok/s from 0.5 ms) ∪ (10 tok/s from 1 ms) up to 2 ms: 0.5 × 5 + 1 × 10; a dominated point adds nothing
    assert hypervolume_2d([(10, 1), (5, 0.5), (4, 1.5)], (0, 2)) == pytest.approx(12.5)
    assert hypervolume_2d([(10, 3)], (0, 2)) == 0

    def run(run_id: str, cell: CellResult, learned: float | None = None) -> RunResults:
        return RunResults("x", "x.yaml", run_id, "", "", "", "", [cell], learned_threshold=learned)

    ok = CellResult(id="c", study="s", model="m", workload="w", engine="vllm", gpu="h100", gpus=1, simulated=False,
                    status="ok", trials_completed=5, first_latency="ttft_p99", best_goodput=2.0,
                    baseline_throughput=100.0, front=[[100.0, 50.0]], reference=[0.0, 100.0])
    broken = CellResult(id="c", study="", model="m", workload="w", engine="vllm", gpu="h100", gpus=1,
                        simulated=False, status="error: vllm is not importable by python3")
    earlier = [run("20260101T000000Z", ok, learned=0.01), run("20260102T000000Z", broken)]
    now = run("20260103T000000Z", broken)
    assert choose_threshold(now, earlier, 0.10, 0.05)[0] == 0.05  # learned 1% is below the floor
    assert choose_threshold(now, earlier[1:], 0.10, 0.05)[0] == 0.10  # nothing learned: the default
    comparison, = compare_run(now, earlier, 0.05)
    assert comparison.previous_run == "20260101T000000Z"  # the last run in which the cell worked
    assert comparison.regressed and "the run before had 5 completed trials" in comparison.note
