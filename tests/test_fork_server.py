"""The fork server (tuner/runner/forkserver.py): a server forked from it is the server a cold start would
have been (argv, environment, folder, log, exit code, readiness), never imports the engine again, and dies
with whoever asked for it; without a usable fork server the runner starts the server cold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuner.engines.base import ServerSpec
from tuner.runner.forkserver import MARKER
from tuner.runner.server import ManagedServer, ServerFailed, fork_from, free_port, start_fork_server

ENGINE = '''\
import os, time
time.sleep(0.5)  # an engine's slow import
print(f"fakeengine imported by pid {os.getpid()}", flush=True)
'''

SERVE = '''\
import argparse, http.server, os, signal, sys
parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--exit", type=int, default=None)
args = parser.parse_args()
print(f"argv={sys.argv[1:]} FOO={os.environ.get('FOO')} cwd={os.getcwd()} name={__name__}", flush=True)
if args.exit is not None:
    sys.exit(args.exit)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass

signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
http.server.HTTPServer(("127.0.0.1", args.port), Health).serve_forever()
'''


@pytest.fixture
def engine(tmp_path, monkeypatch):
    package = tmp_path / "pkgs" / "fakeengine"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(ENGINE)
    (package / "serve.py").write_text(SERVE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]))
    fork = start_fork_server(sys.executable, ("fakeengine", "fakeengine.serve_missing"), tmp_path / "fork.log")
    yield fork
    fork.close()


def spec(*extra: str, env: dict[str, str] | None = None) -> ServerSpec:
    port = free_port()
    return ServerSpec(argv=[sys.executable, "-m", "fakeengine.serve", "--port", str(port), *extra], env=env or {},
                      url=f"http://127.0.0.1:{port}", served_model_name="m")


def test_a_forked_server_is_what_a_cold_start_would_be(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = {}
    for name, fork in (("cold", None), ("forked", engine.address)):
        server = ManagedServer(spec(env={"FOO": name}), tmp_path / name / "server.log", fork_server=fork)
        server.start()
        assert server.forked == (fork is not None)
        assert server.wait_ready(60) > 0
        assert int((tmp_path / name / "server.pid").read_text()) == server.process.pid == os.getpgid(server.process.pid)
        runs[name] = (server.stop(), server.log_path.read_text())
    (cold_code, cold_log), (forked_code, forked_log) = runs["cold"], runs["forked"]
    assert forked_code == cold_code == 0
    assert f"FOO=forked cwd={tmp_path} name=__main__" in forked_log and "argv=['--port'," in forked_log
    assert forked_log.startswith(MARKER) and f"(pid {engine.process.pid})" in forked_log.splitlines()[0]
    # the engine was imported once, by the fork server, and never again by the server forked from it
    assert "fakeengine imported" in cold_log and "fakeengine imported" not in forked_log
    fork_log = (tmp_path / "fork.log").read_text()
    assert f"fakeengine imported by pid {engine.process.pid}" in fork_log
    assert "not preloaded: fakeengine.serve_missing" in fork_log and "preloaded 1 of 2 modules" in fork_log


def test_a_forked_server_s_exit_code_comes_back(engine, tmp_path):
    server = ManagedServer(spec("--exit", "7"), tmp_path / "s" / "server.log", fork_server=engine.address)
    server.start()
    assert server.forked
    with pytest.raises(ServerFailed, match="exited with code 7"):
        server.wait_ready(30)
    assert server.returncode == 7


REQUESTER = '''\
import sys, time
from pathlib import Path
from tuner.runner.server import ForkServer, fork_from
argv = sys.argv[3:]
process = fork_from(ForkServer(python=argv[0], folder=sys.argv[1]), argv, {}, Path(sys.argv[2]), 30)
print(process.pid, flush=True)
time.sleep(600)
'''


def test_a_forked_server_dies_with_its_requester(engine, tmp_path):
    """As PR_SET_PDEATHSIG does for a server the actor starts itself: SIGKILL the requester, the server ends."""
    requester = subprocess.Popen([sys.executable, "-c", REQUESTER, engine.address.folder,
                                  str(tmp_path / "server.log"), *spec().argv], stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert requester.stdout is not None
    pid = int(requester.stdout.readline())
    log, deadline = tmp_path / "server.log", time.monotonic() + 30
    while not (log.exists() and "argv=" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(requester.pid, signal.SIGKILL)
    requester.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    assert int((tmp_path / "server.log.exit").read_text()) == -signal.SIGKILL


def test_without_a_running_fork_server_the_server_starts_cold(engine, tmp_path):
    other_python = spec()
    assert fork_from(engine.address, ["/usr/bin/python3", *other_python.argv[1:]], {}, tmp_path / "a.log", 5) is None
    engine.close()
    server = ManagedServer(spec(), tmp_path / "s" / "server.log", fork_server=engine.address)
    server.start()
    assert not server.forked
    assert server.wait_ready(60) > 0
    assert "fakeengine imported" in server.log_path.read_text()
    assert server.stop() == 0


def test_a_fork_server_that_never_started_is_not_waited_for(tmp_path):
    broken = start_fork_server("/bin/false", ("fakeengine",), tmp_path / "fork.log")  # exits at once
    # its starter names its process at once, so a requester can tell "still importing" from "gone"
    assert int(Path(broken.address.folder, "pid").read_text()) == broken.process.pid
    broken.process.wait()
    argv = ["/bin/false", "-m", "fakeengine.serve", "--port", "1"]
    assert fork_from(broken.address, argv, {}, tmp_path / "server.log", wait_s=300) is None
    broken.close()


def test_the_fork_server_ends_with_the_process_that_started_it(tmp_path):
    code = textwrap.dedent(f'''
        import sys, time
        from pathlib import Path
        from tuner.runner.server import start_fork_server
        fork = start_fork_server(sys.executable, ("json",), Path({str(tmp_path / "fork.log")!r}))
        print(fork.process.pid, flush=True)
        time.sleep(600)
    ''')
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert owner.stdout is not None
    pid = int(owner.stdout.readline())
    assert Path(f"/proc/{pid}").exists()
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2:3] \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
