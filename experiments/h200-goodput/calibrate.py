"""Fit the simulator's H200 constants to the real vLLM 0.26.0 runs committed in `results/` and
`results-r2/` (every completed trial but speculation on dummy weights, and the two hand-run fp8 replays)
and write them where `tune --prescreen sim` looks for an earlier study's calibration of this hardware:
run.sh copies the JSON into the machine's calibration cache, so the GPU study starts screening after its
defaults trial.

    python experiments/h200-goodput/calibrate.py   # writes calibration-h200-vllm-0.26.0-llama-3.1-8b.json
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tuner.simulator.calibration import fit, simulate_observation  # noqa: E402
from tuner.simulator.observations import Observation, observations_from_study  # noqa: E402
from tuner.workload.request import TraceRequest  # noqa: E402
from tuner.workload.transform import load_workload  # noqa: E402

HERE = Path(__file__).resolve().parent
TRACE = "workloads/azure_conv_rows0-399.jsonl"
# `--time-scale` of these studies, which predate StudyRecord.selection (README.md, run.sh); also read by
# experiments/benchmarks/sim_fidelity.py
TIME_SCALES = {"h200-goodput": 6.0, "h200-goodput-ts12": 12.0, "h200-goodput-r2": 12.0}
HAND_RUN_TIME_SCALE = 12.0  # the fp8-mnbt2048 replays (fp8-mnbt2048.txt)
BENCH_KEYS = {"output_throughput": "Output token throughput", "ttft_p99": "P99 TTFT", "tpot_p99": "P99 TPOT",
              "ttft_mean": "Mean TTFT", "ttft_median": "Median TTFT", "tpot_mean": "Mean TPOT",
              "tpot_median": "Median TPOT"}


def hand_runs() -> list[Observation]:
    """The `tune bench` outputs of the hand-started `--quantization fp8 --max-num-batched-tokens 2048` server."""
    out = []
    for path in sorted((HERE / "results").glob("fp8-mnbt2048-run*.txt")):
        text = path.read_text()
        measured = {name: float(re.search(rf"{re.escape(label)}[^:]*:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
                    for name, label in BENCH_KEYS.items()}
        config = {"quantization": "fp8", "max_num_batched_tokens": 2048}
        out.append(Observation(label=f"fp8-mnbt2048#{path.stem[-1]}", engine="vllm", version="0.26.0", gpu="h200",
                               model_shape="llama-3.1-8b", config=config, workload=TRACE, rows=400,
                               max_model_len=6144, measured=measured, time_scale=HAND_RUN_TIME_SCALE))
    return out


def stored_runs(path: Path, defaults: dict) -> list[Observation]:
    """The studies' trials in one store, each replayed at its study's time scale."""
    url = f"sqlite:///{path}"
    out = []
    for summary in optuna.get_all_study_summaries(url, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=url)
        selection = {"time_scale": TIME_SCALES[summary.study_name]}
        out += observations_from_study(study, {**defaults, "selection": selection})
    return out


@cache
def requests_of(workload: str, rows: int, time_scale: float) -> tuple[TraceRequest, ...]:
    return tuple(load_workload(ROOT / workload, rows=rows, time_scale=time_scale))


def main() -> int:
    defaults = {"shape": "llama-3.1-8b", "gpu": "h200"}
    stored = [o for results in ("results", "results-r2") for o in stored_runs(HERE / results / "optuna.db", defaults)]
    # n-gram drafts on dummy weights are accepted ~100 % of the time: not what the model should learn
    real = [o for o in stored if o.measured and o.config.get("speculative_method", "none") == "none"] + hand_runs()
    predict = simulate_observation(lambda o: requests_of(o.workload, o.rows, o.time_scale))
    calibration = fit(real, predict)
    path = calibration.save(HERE / f"calibration-{calibration.key}.json")
    print(f"fitted on {len(real)} real runs ({', '.join(o.label for o in real)}): loss {calibration.loss:.3f}")
    for o in real:
        sim = predict(o, calibration.constants) or {}
        print(f"  {o.label:22s} " + "  ".join(f"{m} {sim.get(m, 0):.0f}/{o.measured.get(m, 0):.0f}"
                                               for m in ("output_throughput", "ttft_p99", "tpot_p99")))
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
