"""A fork server for engine servers: one process imports the engine's modules once, then forks every
trial's server from that state, so no server pays the import again (vLLM 0.26 on an H200: about 20 s
in the API server and as much again in its engine core, of a ~100 s start).

Run by path with the engine's interpreter, stdlib only (the engine's virtualenv need not hold the tuner):

    python forkserver.py FOLDER MODULE [MODULE ...]

It imports the modules (one that fails is reported and skipped), refuses to serve if that initialised
CUDA (a forked child could not use it), then listens on FOLDER/socket (the folder is private to the user;
its starter wrote FOLDER/pid). A request is one JSON line {module, args, env, cwd, log, exit}; the answer is
{"pid": N}. The child starts a new session, writes stdout and stderr to `log`, takes `env` and `cwd` as
its own and runs `python -m module args` in-process, as a cold start would. The request's connection
stays open in the child as its lifeline: when the requester ends, even by SIGKILL, the child kills its
process group, as PR_SET_PDEATHSIG does for a server the requester started itself. The fork server
writes each child's exit code (Popen's convention: -N for signal N) to the request's `exit` path.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time

MAX_REQUEST_BYTES = 1 << 20
MARKER = "servetune: forked from the fork server"  # the first line of a forked server's log


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk or len(data) + len(chunk) > MAX_REQUEST_BYTES:
            raise ValueError("incomplete or oversized request")
        data += chunk
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    for key in ("module", "args", "env", "cwd", "log", "exit"):
        if key not in request:
            raise ValueError(f"request without {key!r}")
    return request


def _lifeline(conn: socket.socket) -> None:
    """In the child: the requester sends nothing more; EOF (or an error) means it ended."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)


def _become_server(listener: socket.socket, conn: socket.socket, request: dict, server_pid: int) -> None:
    """In the child, after fork: the process a cold `python -m module args` would have been."""
    try:
        listener.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        threading.Thread(target=_lifeline, args=(conn,), daemon=True, name="servetune-lifeline").start()
        print(f"{MARKER} (pid {server_pid}), preloaded: {' '.join(sorted(_preloaded))}", flush=True)
        sys.argv = [request["module"], *request["args"]]
        sys.modules.pop(request["module"], None)  # run as __main__ only, as `python -m` does (imports stay)
    except BaseException as exc:  # noqa: BLE001  # nothing may return into the fork server's loop
        os.write(2, f"servetune fork server: child set-up failed: {exc!r}\n".encode())
        os._exit(70)
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)  # leaves through the interpreter's normal exit (atexit handlers run), never the loop


def _reap(children: dict[int, str]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = children.pop(pid, None)
        if path:
            try:
                with open(path + ".tmp", "w") as handle:
                    handle.write(f"{os.waitstatus_to_exitcode(status)}\n")
                os.replace(path + ".tmp", path)
            except OSError:
                pass


_preloaded: list[str] = []


def _threads() -> str:
    """The threads the imports left running: Python's by name, and the OS count (native ones included)."""
    named = [thread.name for thread in threading.enumerate() if thread is not threading.current_thread()]
    try:
        with open("/proc/self/status") as handle:
            count = next(line.split()[1] for line in handle if line.startswith("Threads:"))
    except (OSError, StopIteration):
        count = "?"
    return f"{count} OS thread(s)" + (f", Python threads besides the main one: {', '.join(named)}" if named else "")


def serve(folder: str, modules: list[str]) -> None:
    started = time.monotonic()
    for module in modules:
        try:
            importlib.import_module(module)
            _preloaded.append(module)
        except Exception as exc:  # noqa: BLE001  # an engine build without this module: fork without it
            print(f"not preloaded: {module}: {exc!r}", file=sys.stderr, flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print("preloading initialised CUDA, so forked servers could not use it: not serving", flush=True)
        sys.exit(3)
    print(f"preloaded {len(_preloaded)} of {len(modules)} modules in {time.monotonic() - started:.1f} s; "
          f"{_threads()} (a forked child has only the forking one)", flush=True)
    path = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.replace(path + ".tmp", path)  # appears only once it accepts
    listener.settimeout(0.25)
    parent = os.getppid()
    children: dict[int, str] = {}
    while os.getppid() == parent:  # the owner (tune) gone: stop forking; the children keep their lifelines
        _reap(children)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        try:
            conn.settimeout(10)
            request = _read_request(conn)
        except (OSError, ValueError) as exc:
            print(f"bad request: {exc}", file=sys.stderr, flush=True)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            conn.settimeout(None)
            _become_server(listener, conn, request, os.getppid())
        children[pid] = request["exit"]
        try:
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except OSError:
            pass  # the requester is gone; the child's lifeline ends it
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
