"""How well does the simulator rank real configurations? Every real GPU trial committed under
experiments/, replayed in-process through the simulator with the trial's own configuration, GPU,
model shape and trace slice, against what the GPU measured.

Two simulators per trial:
- prior: the performance model with datasheet-level constants (`calibration.PRIOR`), no fitting;
- calibrated, leave-one-out: constants fitted (`calibration.fit`) on the OTHER distinct
  configurations of the same (GPU, engine version, model shape); where fewer than two are left, on
  the same engine version and model shape measured on other GPUs (the constants are shares of the
  datasheet, so they carry across Hopper parts). Repeats of one configuration are left out together.

H100 fits start from the datasheet prior (`calibration.PRIOR`, up to 60 evaluations); fits for other
GPUs start from the shipped defaults (`PerfConstants()`, fitted on H100 trials only) and take up to 30
evaluations: the 400-request H200 replays cost ten times the H100 ones. Not fitted, in prior and fits
alike: TRITON_ATTN's KV share (`PerfConstants.triton_kv_share`), set from the two H200 TRITON_ATTN
configurations, whose rows are therefore in-sample for that one constant (on these trials it cannot
be told apart from fp8 KV's speedup: every TRITON_ATTN trial ran fp8 KV, no other H200 trial did).

Trials: every real-engine trial (vLLM, SGLang) of every study in every `experiments/**/optuna.db`, plus
the hand-run H200 replays parsed by `experiments/h200-goodput/calibrate.py`. Each is replayed with its
study's trace selection (`StudyRecord.selection`; calibrate.py's `TIME_SCALES` for the H200 studies that
predate it). A distinct configuration is (hardware, trace slice, knobs). Left out, with the reason printed:
speculative decoding on dummy weights (the stub model repeats itself, so drafts are accepted ~100 %).

Reported per engine: Spearman rho of the distinct configurations, per metric, overall and per
hardware; whether the sim's pick (best predicted throughput per hardware and trace) is within 3 % of
the real best; sim/real per trial; and whether trials that failed to start are refused by the
simulator with the engine's message.

    PYTHONPATH=. python experiments/benchmarks/sim_fidelity.py      # writes sim_fidelity.md/.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path
from types import ModuleType

import numpy as np
import optuna

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from tuner.simulator.calibration import PRIOR, Calibration, fit, simulate_observation
from tuner.simulator.config import EngineStartupError
from tuner.simulator.constants import PerfConstants
from tuner.simulator.observations import Observation, observations_from_study
from tuner.simulator.offline import PREDICTED_METRICS
from tuner.simulator.support import check_engine

# What a folder's studies do not record themselves (from its README.md)
STORE_DEFAULTS = {"h100-vllm": {"gpu": "h100", "engine_versions": {"vllm": "0.26.0"}}}
HIGHER_IS_BETTER = {"output_throughput": True, "ttft_p99": False, "tpot_p99": False}
MAX_EVALS = {"h100": 60}  # per GPU; others: OTHER_GPU_EVALS from the H100-fitted defaults
OTHER_GPU_EVALS = 30
OTHER_GPU_START = PerfConstants()
# What differs from GPU to GPU: how close GEMMs and KV reads get to the datasheet. The kernels' own
# constants (attention, CPU overhead, fp8 KV) carry over: fitted on H200 they wander, none of its
# trials telling fp8 KV from TRITON_ATTN apart
OTHER_GPU_FITTED = ("linear_mfu", "gemm_ramp_tokens", "kv_bw_efficiency")


def _load_h200() -> ModuleType:
    """experiments/h200-goodput/calibrate.py: its studies' time scales, hand-run replays, cached traces."""
    path = ROOT / "experiments" / "h200-goodput" / "calibrate.py"
    spec = importlib.util.spec_from_file_location("h200_calibrate", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H200 = _load_h200()
predict = simulate_observation(lambda o: H200.requests_of(o.workload, o.rows, o.time_scale))


def config_id(o: Observation) -> str:
    return f"{o.key}|{trace_of(o)}|{json.dumps(o.config, sort_keys=True)}"


def trace_of(o: Observation) -> str:
    return f"{Path(o.workload).stem}[:{o.rows}] x{o.time_scale:g}"


def speculative(config: dict) -> bool:
    return config.get("speculative_method", "none") not in (None, "none") or bool(config.get("speculative"))


def load() -> tuple[list[Observation], list[str]]:
    """Every real trial committed under experiments/, and why any of them is left out."""
    observations: list[Observation] = []
    left_out: list[str] = []
    for path in sorted((ROOT / "experiments").glob("**/optuna.db")):
        url = f"sqlite:///{path}"
        try:
            summaries = optuna.get_all_study_summaries(url, include_best_trial=False)
        except Exception as exc:  # noqa: BLE001 - a store this Optuna cannot read is reported, not fatal
            left_out.append(f"{path.relative_to(ROOT)}: unreadable ({type(exc).__name__})")
            continue
        folder = path.relative_to(ROOT / "experiments").parts[0]
        for summary in summaries:
            study = optuna.load_study(study_name=summary.study_name, storage=url)
            defaults = dict(STORE_DEFAULTS.get(folder, {}))
            if summary.study_name in H200.TIME_SCALES:  # studies from before StudyRecord.selection
                defaults["selection"] = {"time_scale": H200.TIME_SCALES[summary.study_name]}
            dummy = Path(str(study.user_attrs.get("model", ""))).parent.name == "stub-models"
            for o in observations_from_study(study, defaults):
                if dummy and speculative(o.config) and o.measured:
                    left_out.append(f"{o.label}: speculative decoding ({o.config.get('speculative_method')}) on "
                                    "dummy weights; drafts of a model that repeats itself are accepted ~100 %")
                    continue
                observations.append(o)
    observations += H200.hand_runs()
    return observations, left_out


def distinct(observations: list[Observation]) -> dict[str, list[Observation]]:
    groups: dict[str, list[Observation]] = defaultdict(list)
    for o in observations:
        if o.measured:
            groups[config_id(o)].append(o)
    return dict(groups)


def training_set(held: str, groups: dict[str, list[Observation]]) -> tuple[list[Observation], str]:
    """One observation per other distinct configuration (the first), same key; else other GPUs."""
    first = groups[held][0]
    same = [g[0] for cid, g in groups.items() if cid != held and g[0].key == first.key]
    if len(same) >= 2:
        return same, "same hardware"
    family = (first.engine, first.version, first.model_shape)
    other = [g[0] for g in groups.values() if g[0].gpu != first.gpu
             and (g[0].engine, g[0].version, g[0].model_shape) == family]
    return other, "other GPUs"


def fit_job(job: tuple[str, list[Observation]]) -> tuple[str, Calibration]:
    name, train = job
    started = time.time()
    gpu = train[0].gpu
    if gpu in MAX_EVALS:
        calibration = fit(train, predict, start=PRIOR, max_evals=MAX_EVALS[gpu])
    else:
        calibration = fit(train, predict, start=OTHER_GPU_START, fitted=OTHER_GPU_FITTED, max_evals=OTHER_GPU_EVALS)
    print(f"fitted on {len(train)} trials in {time.time() - started:.0f} s: loss {calibration.loss:.4f}",
          file=sys.stderr, flush=True)
    return name, calibration


def training_key(train: list[Observation]) -> str:
    return ",".join(sorted(o.label for o in train))


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: list[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    order = values.argsort()
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for v in np.unique(values):  # ties share their mean rank
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def mean_measured(group: list[Observation]) -> dict[str, float]:
    return {m: float(np.mean([o.measured[m] for o in group])) for m in PREDICTED_METRICS}


def main() -> int:
    started = time.time()
    observations, left_out = load()
    for line in left_out:
        print(f"left out: {line}", file=sys.stderr)
    groups = distinct(observations)
    jobs = {}
    for cid in groups:
        train, how = training_set(cid, groups)
        jobs[cid] = (train, how)
    full_keys = sorted({g[0].key for g in groups.values()})
    full_keys = [key for key in full_keys if sum(g[0].key == key for g in groups.values()) >= 3]
    sets = {f"full:{key}": [g[0] for g in groups.values() if g[0].key == key] for key in full_keys}
    sets.update({cid: train for cid, (train, _) in jobs.items() if train})
    unique = {training_key(train): train for train in sets.values()}  # one fit per distinct training set
    with Pool(2) as pool:
        fitted = dict(pool.imap_unordered(fit_job, list(unique.items()), chunksize=1))
    fits = {name: fitted[training_key(train)] for name, train in sets.items()}

    rows = []
    for cid, group in groups.items():
        o = group[0]
        prior = predict(o, PRIOR) or {}
        loo = predict(o, fits[cid].constants) if cid in fits else None
        rows.append({"config_id": cid, "key": o.key, "engine": o.engine, "gpu": o.gpu, "config": o.config,
                     "trace": trace_of(o),
                     "trials": [g.label for g in group], "real": mean_measured(group), "prior": prior,
                     "loo": loo or {}, "trained_on": jobs[cid][1],
                     "constants": fits[cid].constants.as_dict() if cid in fits else None})
    refused = []
    for o in observations:
        if o.failure and o.failure != "constraint":  # refused by the space's constraints: never launched
            try:
                check_engine(o.sim_config(PRIOR).resolved())  # the version's refusals, then vLLM's checks
                refused.append((o.label, o.config, None))
            except EngineStartupError as exc:
                refused.append((o.label, o.config, str(exc)))
    report = render(rows, refused, {k: fits[f"full:{k}"] for k in full_keys}, left_out, time.time() - started)
    (HERE / "sim_fidelity.md").write_text(report)
    (HERE / "sim_fidelity.json").write_text(json.dumps(
        {"rows": rows, "left_out": left_out,
         "fits": {k: fits[f"full:{k}"].constants.as_dict() for k in full_keys}}, indent=1) + "\n")
    print(report)
    return 0


def scores(rows: list[dict], which: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in PREDICTED_METRICS:
        pairs = [(r[which][metric], r["real"][metric]) for r in rows if r[which].get(metric)]
        out[metric] = spearman([p for p, _ in pairs], [m for _, m in pairs]) if len(pairs) == len(rows) else None
    return out


def pick_gap(rows: list[dict], which: str) -> list[str]:
    """Per hardware: the real throughput of the sim's top pick, against the real best."""
    lines = []
    for key, trace in sorted({(r["key"], r["trace"]) for r in rows}):
        mine = [r for r in rows if (r["key"], r["trace"]) == (key, trace) and r[which].get("output_throughput")]
        if len(mine) < 2:
            continue
        pick = max(mine, key=lambda r: r[which]["output_throughput"])
        best = max(mine, key=lambda r: r["real"]["output_throughput"])
        gap = 1 - pick["real"]["output_throughput"] / best["real"]["output_throughput"]
        lines.append(f"{key}, {trace}: pick {pick['real']['output_throughput']:.0f} tok/s vs real best "
                     f"{best['real']['output_throughput']:.0f} ({gap:.1%} below)")
    return lines


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(rows: list[dict], refused: list, fits: dict[str, Calibration], left_out: list[str],
           seconds: float) -> str:
    out = ["# Simulator fidelity against every committed real GPU trial", "",
           "Generated by `experiments/benchmarks/sim_fidelity.py` (re-run whenever the model changes). "
           "Distinct configurations; repeats averaged. *prior*: datasheet constants, no fitting. "
           "*LOO*: constants fitted leaving that configuration out (see the script's docstring). "
           "Not fitted in either: TRITON_ATTN's KV share, set from the two H200 TRITON_ATTN configurations "
           "(in-sample for those two rows). A study's trace selection (rows, time scale) is replayed as it "
           "ran; *x12*: 12x the trace's arrival rate.", ""]
    for engine in ("vllm", "sglang"):
        mine = [r for r in rows if r["engine"] == engine]
        if not mine:
            continue
        out += [f"## {engine} ({len(mine)} distinct configurations, "
                f"{sum(len(r['trials']) for r in mine)} trials)", "",
                "| Spearman rho | " + " | ".join(PREDICTED_METRICS) + " |", "|---|---|---|---|"]
        for which in ("prior", "loo"):
            s = scores(mine, which)
            out.append(f"| {which} | " + " | ".join(_fmt(s[m]) for m in PREDICTED_METRICS) + " |")
        subsets = {key: [r for r in mine if r["key"] == key] for key in sorted({r["key"] for r in mine})}
        for key, trace in sorted({(r["key"], r["trace"]) for r in mine}):
            if len({r["trace"] for r in subsets[key]}) > 1:
                subsets[f"{key}, {trace}"] = [r for r in mine if (r["key"], r["trace"]) == (key, trace)]
        for name, sub in subsets.items():
            if len(sub) >= 3 and len(subsets) > 1:
                for which in ("prior", "loo"):
                    s = scores(sub, which)
                    out.append(f"| {which}, {name} ({len(sub)}) | "
                               + " | ".join(_fmt(s[m]) for m in PREDICTED_METRICS) + " |")
        out += ["", "Sim's pick (LOO): " + "; ".join(pick_gap(mine, "loo")) or "–",
                "", "Sim's pick (prior): " + "; ".join(pick_gap(mine, "prior")) or "–", "",
                "| hardware | trace | config | trials | real tok/s | sim/real tok/s (prior, LOO) | real TTFT p99 ms | "
                "sim/real TTFT p99 | real TPOT p99 ms | sim/real TPOT p99 | LOO fitted on |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (r["key"], r["trace"], -r["real"]["output_throughput"])):
            real = r["real"]

            def ratio(metric: str, which: str, r: dict = r, real: dict = real) -> str:
                value = r[which].get(metric)
                return f"{value / real[metric]:.2f}" if value else "–"
            config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            out.append(f"| {r['key']} | {r['trace']} | {config} | {', '.join(r['trials'])} | "
                       f"{real['output_throughput']:.0f} | "
                       f"{ratio('output_throughput', 'prior')}, {ratio('output_throughput', 'loo')} | "
                       f"{real['ttft_p99']:.0f} | {ratio('ttft_p99', 'prior')}, {ratio('ttft_p99', 'loo')} | "
                       f"{real['tpot_p99']:.0f} | {ratio('tpot_p99', 'prior')}, {ratio('tpot_p99', 'loo')} | "
                       f"{r['trained_on']} |")
        out.append("")
    out += ["## Left out", ""] + [f"- {line}" for line in left_out] + [""]
    out += ["## Trials that failed to start", "", "| trial | config | simulator |", "|---|---|---|"]
    for label, config, message in refused:
        out.append(f"| {label} | {json.dumps(config)} | {'refused: ' + message if message else 'NOT refused'} |")
    out += ["", "## Constants fitted on all configurations of each hardware", "",
            "| key | " + " | ".join(PRIOR.as_dict()) + " | loss |", "|---" * (len(PRIOR.as_dict()) + 2) + "|",
            "| prior | " + " | ".join(f"{v:.4g}" for v in PRIOR.as_dict().values()) + " | |"]
    for key, calibration in fits.items():
        out.append(f"| {key} | " + " | ".join(f"{v:.4g}" for v in calibration.constants.as_dict().values())
                   + f" | {calibration.loss:.4f} |")
    out += ["", f"({seconds:.0f} s on this machine.)", ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
