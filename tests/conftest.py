"""Shared test machinery: deadlines, and real achilles processes stopped by PID.

The harness itself is :mod:`achilles.testing` (shared with the benchmarks): every
process a test starts runs in its own session with an isolated environment and is
stopped by a finalizer (SIGTERM, then SIGKILL to its process group), whatever the
test's outcome. Here are the fixtures around it: a cluster's output is printed when
its test failed, and the session fails if any process is left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from achilles import testing
from achilles.testing import Proc, WaitFailed, wait_until

__all__ = ["ROOT", "Cluster", "Proc", "WaitFailed", "child_env", "run_python", "wait_until"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the environment with nothing of achilles configured (not even a user .env)
child_env = testing.isolated_env


class Cluster(testing.Cluster):
    """A server and nodes started with the CLI, on 127.0.0.1 and a free port.

    The nodes run in ``workdir`` (no access to the tests' modules); the logs go to a
    sibling directory, which pytest's temporary-directory retention cleans up.
    """

    def __init__(self, request: Any, workdir: str) -> None:
        super().__init__(workdir, log_dir=workdir.rstrip(os.sep) + "-logs", log_level="INFO")
        self.request = request

    def stop(self) -> None:
        """Stop every process; print their output if the test failed."""
        super().stop()
        failed = getattr(self.request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for proc in self.processes():
                print(f"--- output of {proc.name} (pid {proc.pid}) ---\n{proc.output()}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """Keep each phase's report on the item (Cluster.stop reads rep_call)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _make_cluster(request: Any, tmp_factory: Any, nodes: int, processes: int) -> Cluster:
    """A server and nodes started one after another, stopped by a finalizer."""
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
    monkeypatch.setenv("XDG_CONFIG_HOME", testing.empty_config_home())
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def check_process_leak() -> Any:
    """Fail the run if any process a test started is still alive at the end."""
    yield
    leaked = testing.leftover_processes()
    for proc in leaked:
        proc.stop()
    assert not leaked, f"processes left behind: {[f'{p.name} pid {p.pid}' for p in leaked]}"


def run_python(code: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a program in a fresh interpreter (crochet-style process-level tests)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, **kwargs
    )
