"""A stack sampler for finding where a server's start-up goes (run.sh: PROBE=1 on a hand-started server).

Put this folder first on PYTHONPATH with STACKPROBE_OUT=PREFIX: every Python process of the server (the API
server, and the engine core it forks or spawns) writes PREFIX.<pid>.txt, one line per thread every 0.2 s for
STACKPROBE_SECONDS (90): `time pid thread | innermost frame < caller < ...` (file:function:line, 16 frames).
Read the files with `probe_summary.py`. Sampling reads `sys._current_frames()`: no ptrace, no network.
"""

import os
import sys
import threading
import time


def _frames(frame, depth=16):
    out = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append(f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(out)


def _sample(prefix, seconds):
    me = threading.get_ident()
    end = time.time() + seconds
    with open(f"{prefix}.{os.getpid()}.txt", "a", buffering=1) as out:
        while time.time() < end:
            now = time.time()
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    out.write(f"{now:.3f} {os.getpid()} {names.get(ident, ident)} | {_frames(frame)}\n")
            time.sleep(0.2)


def _start():
    prefix = os.environ.get("STACKPROBE_OUT")
    if prefix:
        seconds = float(os.environ.get("STACKPROBE_SECONDS", "90"))
        threading.Thread(target=_sample, args=(prefix, seconds), name="stackprobe", daemon=True).start()


_start()
os.register_at_fork(after_in_child=_start)
