"""Shared test machinery: deadlines, and real achilles processes stopped by PID.

Modelled on distributed's ``popen``: every process a test starts is stopped by a
finalizer (SIGTERM to its process group, then SIGKILL), whatever the test's outcome;
its captured output is printed when the test failed; and the session fails if any
process is left behind.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_started: list["Proc"] = []


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # sync-ok: the poll interval of a deadline wait


class Proc:
    """A child process in its own session, output captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None, name: str = "proc") -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"achilles-{name}-", suffix=".log",
                                               delete=False)
        self.popen = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                      start_new_session=True)
        self.pid = self.popen.pid
        _started.append(self)

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int, group: bool = False) -> None:
        try:
            os.killpg(self.pid, sig) if group else os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group, by PID."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL, group=True)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.popen.returncode


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _group_alive(pgid: int) -> bool:
    try:
        wait_until(lambda: not _group_members(pgid), timeout=5, what=f"group {pgid} to exit")
        return False
    except AssertionError:
        return True


NO_USER_CONFIG = os.path.join(tempfile.gettempdir(), "achilles-tests-no-user-config")


def child_env(**extra: str) -> dict[str, str]:
    """The environment with nothing of achilles configured (not even a user .env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env["XDG_CONFIG_HOME"] = NO_USER_CONFIG
    env.update(extra)
    return env


class Cluster:
    """A server and nodes started with the CLI, on 127.0.0.1 and a free port."""

    def __init__(self, request: Any, workdir: str) -> None:
        self.secret = secrets.token_hex(16)
        self.workdir = workdir  # nodes run here: no access to the tests' modules
        self.request = request
        self.server: Proc | None = None
        self.nodes: list[Proc] = []
        self.port = 0

    def env(self) -> dict[str, str]:
        return child_env(ACHILLES_SECRET_KEY=self.secret, PYTHONUNBUFFERED="1",
                         ACHILLES_LOG_LEVEL="INFO")

    def start_server(self, port: int = 0, **env: str) -> Proc:
        self.server = Proc([sys.executable, "-m", "achilles", "server", "--port", str(port)],
                           env={**self.env(), **env}, cwd=self.workdir, name="server")
        match = wait_until(lambda: re.search(r"listening on [\d.]+:(\d+)",
                                             self.server.output()), 20, what="server port")
        self.port = int(match.group(1))
        return self.server

    def start_node(self, processes: int = 1, wait: bool = True, **env: str) -> Proc:
        before = self.node_count() if wait else 0
        node = Proc([sys.executable, "-m", "achilles", "node", "--port", str(self.port),
                     "--processes", str(processes)], env={**self.env(), **env},
                    cwd=self.workdir, name=f"node{len(self.nodes)}")
        self.nodes.append(node)
        if wait:
            wait_until(lambda: self.node_count() > before, 20, what="node registration")
        return node

    def status(self) -> dict[str, Any]:
        from achilles import getClusterStatus
        return getClusterStatus(port=self.port, secret_key=self.secret)

    def node_count(self) -> int:
        return len(self.status()["nodes"])

    def kwargs(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "secret_key": self.secret}

    def stop(self) -> None:
        for proc in [*self.nodes, *([self.server] if self.server else [])]:
            proc.stop()
            failed = getattr(self.request.node, "rep_call", None)
            if failed is not None and failed.failed:
                print(f"--- output of {proc.name} (pid {proc.pid}) ---\n{proc.output()}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _make_cluster(request: Any, tmp_factory: Any, nodes: int, processes: int) -> Cluster:
    cluster = Cluster(request, str(tmp_factory.mktemp("nodecwd")))
    request.addfinalizer(cluster.stop)
    cluster.start_server()
    for _ in range(nodes):
        cluster.start_node(processes)
    return cluster


@pytest.fixture(scope="module")
def cluster(request: Any, tmp_path_factory: Any) -> Cluster:
    """A server and two one-worker nodes, shared by a test module."""
    return _make_cluster(request, tmp_path_factory, nodes=2, processes=1)


@pytest.fixture
def fresh_cluster(request: Any, tmp_path_factory: Any) -> Callable[..., Cluster]:
    """Factory for a cluster of a test's own (for tests that break it)."""
    def make(nodes: int = 2, processes: int = 1) -> Cluster:
        return _make_cluster(request, tmp_path_factory, nodes, processes)
    return make


@pytest.fixture
def no_cluster_config(monkeypatch: Any, tmp_path: Any) -> None:
    """Nothing configured: no ACHILLES_* variables and no .env in the working directory."""
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", NO_USER_CONFIG)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def check_process_leak() -> Any:
    """Fail the run if any process a test started is still alive at the end."""
    yield
    leaked = []
    for proc in _started:
        if proc.alive() or _group_alive(proc.pid):
            leaked.append(f"{proc.name} pid {proc.pid}")
            proc.stop()
    assert not leaked, f"processes left behind: {leaked}"


def run_python(code: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a program in a fresh interpreter (crochet-style process-level tests)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
