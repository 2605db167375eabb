"""Campaign efficiency: how much of the GPU time a tuning campaign holds is spent measuring.

A campaign of trials of mixed sizes (TP in {1, 2, 4} x DP in {1, 2}: 1 to 8 GPUs) runs on the
simulator with 8 logical GPUs of a local Ray cluster, twice with the same proposals (seeded random
sampler): with packing (the loop of `Tuner.run`: proposals that do not fit wait while later, smaller
ones use the idle GPUs) and in strict order (lookahead 1: the loop before packing, which waited
with GPUs idle until the next proposal fitted). For each it prints

    utilisation = measuring time / GPU time held
                = sum over trials of (replay wall-clock x GPUs) / (campaign wall-clock x 8)

and where the rest went: start-up (server launch to ready), the rest of each trial (warm-up,
drain of the last requests, teardown), and GPU time outside any trial (actor start, idle GPUs).
The packed schedule is drawn to campaign_gantt.png (one row per logical GPU).

A model of the loop (equal-length trials, random sizes, no Ray) gives the same comparison in
seconds for several lookahead / pass-over bounds: the reason for the bounds `Tuner.run` uses.

    python experiments/benchmarks/campaign_efficiency.py > experiments/benchmarks/campaign_efficiency.txt
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKLOAD = ROOT / "workloads" / "azure_conv_head500.csv"

SPACE = """\
engine: sim
extends: common.yaml
knobs:
  tensor_parallel_size: {flag: --tensor-parallel-size, choices: [1, 2, 4]}
  data_parallel_size: {flag: --data-parallel-size, choices: [1, 2]}
  max_num_seqs: {flag: --max-num-seqs, type: categorical, choices: [32, 64, 128, 256], default: 256}
  enable_prefix_caching: {flag: --enable-prefix-caching, flag_off: --no-enable-prefix-caching}
"""


class CpuSampler(threading.Thread):
    """Busy fraction of this machine's cores (all processes, ours and others'), from /proc/stat."""

    def __init__(self, period_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.samples: list[float] = []
        self.stop = threading.Event()

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def run(self) -> None:
        busy0, total0 = self._read()
        while not self.stop.wait(self.period_s):
            busy1, total1 = self._read()
            if total1 > total0:
                self.samples.append((busy1 - busy0) / (total1 - total0))
            busy0, total0 = busy1, total1


def run_campaign(name: str, out: Path, space: Path, args: argparse.Namespace, lookahead: int | None) -> dict:
    from tuner.cli import main
    from tuner.study.tune import Tuner

    Tuner.lookahead = lookahead
    cpu = CpuSampler()
    cpu.start()
    started = time.monotonic()
    code = main(["--workload", str(WORKLOAD), "--rows", str(args.rows), "--time-scale", str(args.trace_scale),
                 "--engine", "sim", "--gpus", "8", "--sim-time-scale", str(args.sim_time_scale),
                 "--space", str(space), "--sampler", "random", "--seed", "11", "--trials", str(args.trials),
                 "--study-name", name, "--out", str(out), "--no-mlflow", "--quiet"])
    elapsed = time.monotonic() - started
    cpu.stop.set()
    cpu.join()
    if code != 0:
        sys.exit(f"{name}: tune exited with {code}")
    campaign = json.loads((out / name / "campaign.json").read_text())
    campaign["cpu_busy"] = statistics.mean(cpu.samples) if cpu.samples else float("nan")
    campaign["cpu_busy_p90"] = sorted(cpu.samples)[int(0.9 * (len(cpu.samples) - 1))] if cpu.samples else 0.0
    campaign["tune_wall_s"] = elapsed
    return campaign


def breakdown(c: dict) -> dict[str, float]:
    held = c["held_gpu_s"]
    spans = c["spans"]
    startup = sum(s["ready_s"] * s["gpus"] for s in spans)
    in_trials = c["in_trials_gpu_s"]
    measuring = c["measuring_gpu_s"]
    return {"measuring": measuring / held, "start-up": startup / held,
            "rest of trials (warm-up, drain, teardown)": (in_trials - startup - measuring) / held,
            "outside trials (actor start, idle GPUs)": (held - in_trials) / held}


def show(label: str, c: dict) -> None:
    spans = c["spans"]
    sizes = sorted(s["gpus"] for s in spans)
    counts = {g: sizes.count(g) for g in sorted(set(sizes))}
    print(f"\n{label}: {c['trials']} trials, sizes {counts} (GPUs: trials)")
    print(f"  campaign wall-clock       {c['wall_s']:8.1f} s   (tune end to end {c['tune_wall_s']:.1f} s, "
          "with Ray start and report)")
    print(f"  GPU time held             {c['held_gpu_s']:8.1f} GPU-s (wall-clock x {c['gpus']})")
    print(f"  measuring time            {c['measuring_gpu_s']:8.1f} GPU-s")
    print(f"  UTILISATION               {c['utilisation']:8.3f}   (measuring / held)")
    for part, share in breakdown(c).items():
        print(f"    {part:<42} {share:6.3f}")
    ready = [s["ready_s"] for s in spans]
    measure = [s["measure_s"] for s in spans]
    print(f"  per trial: start-up {statistics.mean(ready):.1f} s mean ({max(ready):.1f} max), "
          f"replay {statistics.mean(measure):.1f} s mean ({min(measure):.1f}-{max(measure):.1f})")
    print(f"  machine CPU busy (2 cores, shared with other jobs): mean {c['cpu_busy']:.2f}, "
          f"p90 {c['cpu_busy_p90']:.2f}")


# --- a model of the loop, without Ray: equal-length trials, random sizes -------------------------------

def model(seed: int, lookahead: int, pass_limit: int, trials: int = 24, gpus: int = 8, measure_s: float = 35.0,
          overhead_s: float = 3.0) -> float:
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 4, 2, 4, 8]) for _ in range(trials)]  # TP {1,2,4} x DP {1,2}
    now, free, asked, done, measuring = 0.0, gpus, 0, 0, 0.0
    running: list[tuple[float, int]] = []
    pending: list[list[int]] = []  # [size, passed over]
    while done < trials:
        waiting: list[list[int]] = []
        for item in list(pending):
            if any(w[1] >= pass_limit for w in waiting):
                break
            if item[0] <= free:
                free -= item[0]
                pending.remove(item)
                heapq.heappush(running, (now + measure_s * rng.uniform(0.97, 1.03) + overhead_s, item[0]))
                measuring += measure_s * item[0]
                for w in waiting:
                    w[1] += 1
            else:
                waiting.append(item)
        held_back = any(p[1] >= pass_limit for p in pending)
        if asked < trials and free > 0 and len(pending) < lookahead and not held_back:
            pending.append([sizes[asked], 0])
            asked += 1
            continue
        now, size = heapq.heappop(running)
        free += size
        done += 1
    return measuring / (now * gpus)


def show_model() -> None:
    print("\nmodel of the loop (no Ray; 24 trials of 35 s replay + 3 s overhead, so at most 0.921; "
          "mean over 200 seeds):")
    print("  lookahead  pass-over limit  utilisation")
    for lookahead, pass_limit in ((1, 1), (8, 4), (8, 8), (16, 16), (16, 10**6)):
        mean = statistics.mean(model(seed, lookahead, pass_limit) for seed in range(200))
        label = "strict order" if lookahead == 1 else ("never" if pass_limit > 1000 else str(pass_limit))
        print(f"  {lookahead:>9}  {label:>15}  {mean:11.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--rows", type=int, default=200, help="requests of the Azure conversation trace")
    parser.add_argument("--trace-scale", type=float, default=0.1, help="replay the trace k times faster")
    parser.add_argument("--sim-time-scale", type=float, default=16.0, help="the simulator's clock speed-up")
    parser.add_argument("--skip-strict", action="store_true", help="only the packed campaign")
    args = parser.parse_args()
    print(f"campaign efficiency: simulator (llama-3.1-8b on h100), 8 logical GPUs, {args.trials} trials, "
          f"TP in {{1,2,4}} x DP in {{1,2}}, random sampler (seed 11)")
    print(f"workload: {WORKLOAD.name} first {args.rows} requests, trace x{args.trace_scale:g}, "
          f"simulator clock x{args.sim_time_scale:g}; {os.cpu_count()} CPU cores")
    show_model()
    with tempfile.TemporaryDirectory(prefix="campaign-") as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(SPACE)
        packed = run_campaign("packed", Path(tmp) / "runs", space, args, lookahead=None)
        show("packed (Tuner.run)", packed)
        shutil.copyfile(Path(tmp) / "runs" / "packed" / "schedule.png", HERE / "campaign_gantt.png")
        if not args.skip_strict:
            strict = run_campaign("strict", Path(tmp) / "runs", space, args, lookahead=1)
            show("strict order (lookahead 1, the loop before packing)", strict)
            print(f"\npacked / strict utilisation: {packed['utilisation'] / strict['utilisation']:.2f}x; "
                  f"campaign wall-clock {strict['wall_s'] / packed['wall_s']:.2f}x shorter")
    verdict = "meets" if packed["utilisation"] >= 0.85 else "misses"
    print(f"\nRESULT packed utilisation {packed['utilisation']:.3f} ({verdict} the 0.85 target); "
          f"schedule: experiments/benchmarks/campaign_gantt.png")


if __name__ == "__main__":
    main()
