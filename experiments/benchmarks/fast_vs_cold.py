"""Does a fast-started server measure the same as a cold one with the same flags? (issue #18: within 2 %)

A study's finalists answer it without extra GPU time: each finalist's search trial started cold (its
compile key new to the machine), and its `--repeats` re-measurements started with the same flags, so
they find that trial's compiled graphs in the shared compile cache. Per finalist this prints the cold
run's output throughput, the repeats' mean with a 95 % CI, their ratio, and each server's torch.compile
seconds (from `phases.md` or the run folder's `startup_phases.json`): a repeat that took as long as the
cold start did not hit the cache, and then the comparison is cold against cold.

Since round 3 every server of a study is forked from the fork server, so the study alone compares a cold
compile with a cached one. `--cold-process TRIAL SUMMARY.json ...` adds the other side: runs of the same
flags on the same slice from a server started as a new process by hand (run.sh's TRAIN_REPEATS).
`--cold-study TRIAL STORE NAME` compares under one harness: the runs of TRIAL's flags (search trial and
repeats) against the same flags' runs in a `tune --cold-start` study (every server a new process).

    python experiments/benchmarks/fast_vs_cold.py STORE STUDY [RUN_DIR_OR_PHASES_MD] \
        [--cold-study TRIAL STORE NAME] [--cold-process TRIAL SUMMARY...]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tuner.records.trial import StudyRecord  # noqa: E402


def compile_seconds(source: Path | None) -> dict[str, float]:
    """torch.compile seconds per server label (trial-0010, trial-0010-repeat-1, ...)."""
    if source is None:
        return {}
    if source.is_dir():
        return {p.parent.name: json.loads(p.read_text()).get("torch_compile", 0.0)
                for p in source.glob("*/startup_phases.json")}
    out, column = {}, 3
    for line in source.read_text().splitlines():  # | server | [start |] import | model_load | torch_compile | ...
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "torch_compile" in cells:
            column = cells.index("torch_compile")
        elif len(cells) > column and re.fullmatch(r"trial-\d+(-repeat-\d+)?", cells[0]):
            out[cells[0]] = float(cells[column]) if cells[column] else 0.0
    return out


def cold_process_table(study: optuna.Study, number: int, summaries: list[Path]) -> None:
    """Forked re-measurements of a finalist against runs of its flags on a server started as a new process."""
    estimate = StudyRecord.of(study).finals[str(number)]["remeasured"]["estimates"]
    cold = [json.loads(path.read_text()) for path in summaries]
    print(f"\n| trial {number} | runs | output tok/s (each) | mean | goodput req/s (each) | mean |")
    print("|---|---|---|---|---|---|")
    sides = (("forked, compile cached", [estimate[m]["values"] for m in ("output_throughput", "goodput")]),
             ("new process (by hand)", [[c[m] for c in cold] for m in ("output_throughput", "goodput")]))
    for label, (tok, good) in sides:
        print(f"| {label} | {len(tok)} | {', '.join(f'{v:,.0f}' for v in tok)} | {sum(tok) / len(tok):,.0f} | "
              f"{', '.join(f'{v:.2f}' for v in good)} | {sum(good) / len(good):.2f} |")
    forked, by_hand = estimate["output_throughput"]["values"], [c["output_throughput"] for c in cold]
    ratio = (sum(forked) / len(forked)) / (sum(by_hand) / len(by_hand))
    verdict = "within" if abs(ratio - 1) <= 0.02 else "outside"
    print(f"\nforked / new process, output tok/s: {ratio:.3f} ({verdict} 2 %)")


def all_runs(study: optuna.Study, number: int) -> list[float]:
    """Output tok/s of every run of a trial's flags in a study: the search trial and its re-measurements."""
    summary = study.trials[number].user_attrs.get("summary") or {}
    final = StudyRecord.of(study).finals.get(str(number)) or {}
    repeats = (final.get("remeasured") or {}).get("estimates", {}).get("output_throughput", {}).get("values", [])
    return [summary["output_throughput"], *repeats] if summary.get("output_throughput") else list(repeats)


def cold_study_table(study: optuna.Study, number: int, cold: optuna.Study) -> None:
    """The same harness on both sides: a study's runs of one trial's flags on forked servers against a
    `tune --cold-start` study's runs of the same flags (every server a new process)."""
    params = study.trials[number].params
    twins = [t.number for t in cold.trials if t.params == params and t.user_attrs.get("summary")]
    if not twins:
        print(f"\nno trial of study {cold.study_name} has trial {number}'s flags")
        return
    forked, new = all_runs(study, number), all_runs(cold, twins[0])
    print(f"\n| trial {number}, same harness (tune) | runs | output tok/s (each) | mean |")
    print("|---|---|---|---|")
    for label, values in (("forked from the fork server", forked), ("new process (--cold-start)", new)):
        print(f"| {label} | {len(values)} | {', '.join(f'{v:,.0f}' for v in values)} | "
              f"{sum(values) / len(values):,.0f} |")
    ratio = (sum(forked) / len(forked)) / (sum(new) / len(new))
    print(f"\nforked / new process under tune, output tok/s: {ratio:.3f} "
          f"({'within' if abs(ratio - 1) <= 0.02 else 'outside'} 2 %)")


def main(argv: list[str]) -> int:
    cold_process: list[str] = []
    cold_study: list[str] = []
    if "--cold-study" in argv:
        at = argv.index("--cold-study")
        argv, cold_study = argv[:at] + argv[at + 4:], argv[at + 1:at + 4]
    if "--cold-process" in argv:
        at = argv.index("--cold-process")
        argv, cold_process = argv[:at], argv[at + 1:]
    store, name = argv[0], argv[1]
    phases = compile_seconds(Path(argv[2]) if len(argv) > 2 else None)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{store}" if "://" not in store else store)
    finals = StudyRecord.of(study).finals
    print("| trial | cold tok/s | repeats tok/s (95 % CI) | repeats / cold | within 2 % "
          "| torch.compile s: cold; repeats |")
    print("|---|---|---|---|---|---|")
    for number, final in sorted(finals.items(), key=lambda item: int(item[0])):
        estimate = (final.get("remeasured") or {}).get("estimates", {}).get("output_throughput")
        summary = study.trials[int(number)].user_attrs.get("summary") or {}
        if not estimate or not summary.get("output_throughput"):
            continue
        cold, mean = summary["output_throughput"], estimate["mean"]
        half = (estimate["high"] - estimate["low"]) / 2
        label = f"trial-{int(number):04d}"
        repeats = [phases.get(f"{label}-repeat-{k}") for k in range(1, len(estimate["values"]) + 1)]
        seconds = f"{phases.get(label, '-')}; " + ", ".join("-" if s is None else f"{s:.1f}" for s in repeats)
        print(f"| {number} | {cold:,.0f} | {mean:,.0f} ± {half:,.0f} | {mean / cold:.3f} | "
              f"{'yes' if abs(mean / cold - 1) <= 0.02 else 'no'} | {seconds} |")
    if cold_process:
        cold_process_table(study, int(cold_process[0]), [Path(p) for p in cold_process[1:]])
    if cold_study:
        store = cold_study[1] if "://" in cold_study[1] else f"sqlite:///{cold_study[1]}"
        cold_study_table(study, int(cold_study[0]), optuna.load_study(study_name=cold_study[2], storage=store))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
