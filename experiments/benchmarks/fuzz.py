"""Fuzz the trace readers, YAML search spaces, `tune run` options (--storage and --ray-address among them),
storage URLs and the simulator's HTTP endpoints with many generated inputs.

The checks and input generators are those of tests/test_fuzz.py (which runs a few in CI); here each target
gets N inputs (default 1,000) and a crash does not stop the run: every input is counted as accepted,
rejected (one-line error naming the place, exit 2) or crashed (anything else), and the first crashes are
printed with their input.

    python experiments/benchmarks/fuzz.py [N]      # output committed as experiments/benchmarks/fuzz.txt
"""

from __future__ import annotations

import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import test_fuzz as fuzz  # the generators and checks shared with the test suite

TARGETS = [  # (name, generator of one input as an argument tuple, check)
    ("trace readers (tune workload inspect)", st.tuples(fuzz.trace_files(), fuzz.inspect_options), fuzz.check_trace),
    ("YAML search spaces (load, sample, render)", st.tuples(fuzz.space_texts()), fuzz.check_space),
    ("tune run options", st.tuples(fuzz.run_argvs()), fuzz.check_argv),
    ("--storage URLs (tune export)", st.tuples(fuzz.storage_urls), fuzz.check_storage),
    ("simulator HTTP endpoints", st.tuples(fuzz.http_requests), fuzz.check_sim_http),
]


def run_target(inputs: st.SearchStrategy, check, examples: int) -> tuple[Counter, list[str], float]:
    counts: Counter = Counter()
    crashes: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(inputs)
    def fuzz_one(args: tuple) -> None:
        try:
            counts[check(*args)] += 1
        except Exception as exc:  # a crash: count it, keep its input, go on
            counts["crashed"] += 1
            if len(crashes) < 5:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                crashes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                               f"at {Path(where.filename).name}:{where.lineno}\n      input: {args!r:.300}")

    started = time.perf_counter()
    fuzz_one()
    return counts, crashes, time.perf_counter() - started


def main() -> int:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    import hypothesis

    print(f"fuzz: {examples} generated inputs per target (hypothesis {hypothesis.__version__}, derandomized, "
          f"python {sys.version.split()[0]})\n")
    print(f"{'target':<44}{'inputs':>8}{'accepted':>10}{'rejected':>10}{'crashed':>9}{'ms/input':>10}")
    crashed_any = False
    reports = []
    for name, inputs, check in TARGETS:
        counts, crashes, seconds = run_target(inputs, check, examples)
        total = sum(counts.values())
        print(f"{name:<44}{total:>8}{counts['accepted']:>10}{counts['rejected']:>10}{counts['crashed']:>9}"
              f"{1000 * seconds / max(total, 1):>10.1f}", flush=True)
        if crashes:
            crashed_any = True
            reports.append(f"\n{name}: first crashes\n" + "\n".join(f"  - {c}" for c in crashes))
    print("".join(reports))
    print("\nrejected = one error line naming the file (and line) or the option, exit code 2; "
          "crashed = any other exception or output")
    return 1 if crashed_any else 0


if __name__ == "__main__":
    raise SystemExit(main())
