"""Where one process of a probed server spent a stretch of its start-up (samples of sitecustomize.py).

    python probe_summary.py PREFIX.PID.txt[.gz] [FROM TO]     (FROM/TO: UTC clock times as in vLLM's log, HH:MM:SS)

Counts the main thread's samples: "importing" when any frame is in the import machinery, otherwise the
innermost frame's file and function.
"""

from __future__ import annotations

import collections
import datetime
import gzip
import sys


def clock(epoch: str) -> str:
    return datetime.datetime.fromtimestamp(float(epoch), datetime.timezone.utc).strftime("%H:%M:%S")


def main(argv: list[str]) -> int:
    path, (start, end) = argv[0], (argv[1:3] if len(argv) >= 3 else ("00:00:00", "99:99:99"))
    counts: collections.Counter[str] = collections.Counter()
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as lines:
        for line in lines:
            head, stack = line.rstrip("\n").split(" | ", 1)
            epoch, _pid, thread = head.split(" ", 2)
            if thread == "MainThread" and start <= clock(epoch) < end:
                frames = stack.split(" < ")
                counts["importing" if any("_find_and_load" in f for f in frames)
                       else frames[0].rsplit(":", 1)[0]] += 1
    total = sum(counts.values())
    print(f"{total} samples (0.2 s apart) of the main thread, {start}-{end}")
    for where, n in counts.most_common(10):
        print(f"{n:5d} {n / max(total, 1):6.1%}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
