"""Throwaway achilles clusters on loopback, for tests and benchmarks.

Starts real ``achilles server`` and ``achilles node`` processes on 127.0.0.1 with a free
port and a random secret, and stops every one of them by PID::

    import achilles
    from achilles.testing import start_cluster

    with start_cluster(nodes=2) as cluster:
        with achilles.Pool(**cluster.kwargs()) as pool:
            assert pool.map(abs, [-1, -2]) == [1, 2]

Why each piece is the way it is:

* **Isolated environment.** The processes see no ``ACHILLES_*`` variable of the caller
  and no per-user ``.env`` (``XDG_CONFIG_HOME`` points at an empty directory), and run
  in an empty working directory: a developer's own configuration must never point a
  throwaway cluster at a real one, nor change its limits. Settings reach them only
  when passed explicitly.
* **Readiness from the processes themselves.** The port is read from the server's
  ``listening on HOST:PORT`` line (it binds port 0); a node is ready when the server
  lists it (its name ends in its PID), never after a fixed sleep.
* **Stopped by PID.** Each process runs in its own session; stopping it is SIGTERM to
  the process, a wait, then SIGKILL to its whole process group (its pool workers too),
  as distributed's ``popen`` does. :func:`leftover_processes` lists whatever survived,
  so a test suite can fail on leaks.

This module is not imported by ``import achilles``; import it when you need it. It does
not depend on pytest.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "HOST",
    "Cluster",
    "Proc",
    "WaitFailed",
    "empty_config_home",
    "group_members",
    "isolated_env",
    "leftover_processes",
    "start_cluster",
    "stop_process",
    "wait_until",
]

#: the only address the harness binds or connects to
HOST = "127.0.0.1"
_LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
_started: list[Proc] = []
_config_home: list[str] = []


class WaitFailed(AssertionError):
    """A condition waited for did not hold in time, or the process behind it died.

    An ``AssertionError``, so that a test waiting on a cluster fails rather than errors.
    """


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    alive: Callable[[], bool] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        WaitFailed: after ``timeout`` s, or as soon as ``alive()`` (when given) is false.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise WaitFailed(f"process died while waiting for {what}")
        if time.monotonic() > deadline:
            raise WaitFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # sync-ok: the poll interval of a deadline wait


def empty_config_home() -> str:
    """An empty directory for ``XDG_CONFIG_HOME``, made once per process.

    A fresh private directory rather than a fixed path: nobody else can have planted an
    ``achilles/.env`` in it. It is removed when the process exits.
    """
    if not _config_home:
        path = tempfile.mkdtemp(prefix="achilles-no-user-config-")
        atexit.register(shutil.rmtree, path, True)
        _config_home.append(path)
    return _config_home[0]


def isolated_env(**extra: str) -> dict[str, str]:
    """This process's environment with nothing of achilles configured, plus ``extra``.

    Drops every ``ACHILLES_*`` variable and points ``XDG_CONFIG_HOME`` at an empty
    directory, so that no user-level ``.env`` is read; ``extra`` is applied last.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env["XDG_CONFIG_HOME"] = empty_config_home()
    env.update(extra)
    return env


def proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) for every process, from /proc/<pid>/stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, read from /proc."""
    return [
        pid for pid, (_, group, state) in proc_table().items() if state != "Z" and group == pgid
    ]


def stop_process(
    pid: int, timeout: float = 5.0, popen: subprocess.Popen[Any] | None = None
) -> bool:
    """Stop the session led by ``pid``: SIGTERM, a wait, then SIGKILL to its group.

    Pass ``popen`` for a child of this process, so that it is also reaped. Returns
    whether anything was still running.
    """
    left = False
    if (popen.poll() is None) if popen is not None else bool(group_members(pid)):
        left = True
        _signal(pid, signal.SIGTERM, group=False)
        try:
            if popen is not None:
                popen.wait(timeout)
            else:
                wait_until(lambda: not group_members(pid), timeout, 0.05, f"group {pid} to exit")
        except (subprocess.TimeoutExpired, WaitFailed):
            pass
    if group_members(pid):
        left = True
        _signal(pid, signal.SIGKILL, group=True)
        try:
            wait_until(lambda: not group_members(pid), timeout, 0.05, f"group {pid} to die")
        except WaitFailed:
            pass
    if popen is not None:
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    return left


def _signal(pid: int, sig: int, group: bool) -> None:
    """Send ``sig`` to a process or its group; one that is already gone is no error."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Proc:
    """A child process in its own session, its output (stdout and stderr) in a file.

    ``env`` defaults to :func:`isolated_env`; ``log`` to a new temporary file.
    """

    def __init__(
        self,
        args: list[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str = "proc",
        log: str | None = None,
    ) -> None:
        self.name = name
        if log is None:
            fd, log = tempfile.mkstemp(prefix=f"achilles-{name}-", suffix=".log")
            os.close(fd)
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else isolated_env(),
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        _started.append(self)

    def output(self) -> str:
        """Everything the process has written so far."""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def signal(self, sig: int, group: bool = False) -> None:
        """Send ``sig`` to the process, or to its whole process group."""
        _signal(self.pid, sig, group)

    def kill_group(self, timeout: float = 10.0) -> None:
        """SIGKILL the process and everything in its group at once (a machine dying)."""
        self.signal(signal.SIGKILL, group=True)
        self.popen.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop it (see :func:`stop_process`) and return its exit code."""
        stop_process(self.pid, timeout, popen=self.popen)
        return self.popen.returncode


def leftover_processes(timeout: float = 5.0) -> list[Proc]:
    """Every :class:`Proc` of this process still running, or whose group still is.

    A group is given up to ``timeout`` s to finish exiting before it counts.
    """
    return [proc for proc in _started if proc.alive() or not _group_gone(proc.pid, timeout)]


def _group_gone(pgid: int, timeout: float) -> bool:
    """Whether process group ``pgid`` empties within ``timeout`` s."""
    try:
        wait_until(lambda: not group_members(pgid), timeout, 0.05, f"group {pgid} to exit")
    except WaitFailed:
        return False
    return True


class Cluster:
    """A server and nodes started with the CLI on 127.0.0.1, a free port, a new secret.

    Args:
        workdir: the processes' working directory (keep it empty: no ``.env``, no
            modules of the caller). ``None``: a new temporary directory, removed by
            :meth:`stop` together with the logs.
        log_dir: where each process's output file goes (``None``: the temporary
            directory's, or else the system's temporary directory).
        log_level: ``ACHILLES_LOG_LEVEL`` of the processes.
        keep_pythonpath: ``False`` drops ``PYTHONPATH``, so that nodes see only what is
            installed, as on another machine (they get the caller's modules from
            achilles's shipping of sources).
        env: more variables for every process (``ACHILLES_*`` ones included).
        on_start: called with each process as soon as it is started.
    """

    def __init__(
        self,
        workdir: str | None = None,
        *,
        log_dir: str | None = None,
        log_level: str = "INFO",
        keep_pythonpath: bool = True,
        env: Mapping[str, str] | None = None,
        on_start: Callable[[Proc], None] | None = None,
    ) -> None:
        self.secret = secrets.token_hex(16)
        self._tmp: str | None = None
        if workdir is None:
            self._tmp = tempfile.mkdtemp(prefix="achilles-cluster-")
            workdir = os.path.join(self._tmp, "cwd")
            log_dir = log_dir or os.path.join(self._tmp, "logs")
        self.workdir = workdir
        self.log_dir = log_dir
        for path in (workdir, log_dir):
            if path:
                os.makedirs(path, exist_ok=True)
        self.log_level = log_level
        self.keep_pythonpath = keep_pythonpath
        self.extra_env = dict(env or {})
        self.on_start = on_start
        self.server: Proc | None = None
        self.nodes: list[Proc] = []
        self.port = 0

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of the cluster's processes (see :func:`isolated_env`)."""
        env = isolated_env()
        if not self.keep_pythonpath:
            env.pop("PYTHONPATH", None)
        env.update(
            ACHILLES_SECRET_KEY=self.secret, PYTHONUNBUFFERED="1", ACHILLES_LOG_LEVEL=self.log_level
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def _spawn(self, role: str, name: str, options: list[str], env: dict[str, str]) -> Proc:
        """Start ``python -m achilles ROLE`` on loopback, its log in log_dir if set."""
        log = None
        if self.log_dir:
            fd, log = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=self.log_dir)
            os.close(fd)
        proc = Proc(
            [sys.executable, "-m", "achilles", role, "--host", HOST, *options],
            env=self.env(**env),
            cwd=self.workdir,
            name=name,
            log=log,
        )
        if self.on_start is not None:
            self.on_start(proc)
        return proc

    def start_server(self, port: int = 0, timeout: float = 20.0, **env: str) -> Proc:
        """Start the server (port 0: a free one) and wait for its ``listening on`` line.
        No dashboard unless ``ACHILLES_DASHBOARD`` is given, here or to the cluster
        (test servers must not compete for its port)."""
        env = {"ACHILLES_DASHBOARD": self.extra_env.get("ACHILLES_DASHBOARD", "off"), **env}
        server = self._spawn("server", "server", ["--port", str(port)], env)
        self.server = server
        match = wait_until(
            lambda: _LISTENING.search(server.output()),
            timeout,
            what="the server's port",
            alive=server.alive,
        )
        self.port = int(match.group(1))
        return server

    def start_node(
        self, processes: int = 1, wait: bool = True, timeout: float = 20.0, **env: str
    ) -> Proc:
        """Start a node of ``processes`` workers; with ``wait``, until the server lists it."""
        node = self._spawn(
            "node",
            f"node{len(self.nodes)}",
            ["--port", str(self.port), "--processes", str(processes)],
            env,
        )
        self.nodes.append(node)
        if wait:
            wait_until(
                lambda: node.pid in self.node_pids(),
                timeout,
                what=f"{node.name} to register",
                alive=node.alive,
            )
        return node

    def start(self, nodes: int = 2, processes: int = 1, timeout: float = 60.0) -> Cluster:
        """Start the server and ``nodes`` nodes at once; return when all are registered."""
        self.start_server(timeout=timeout)
        for _ in range(nodes):
            self.start_node(processes, wait=False)
        self.wait_nodes(timeout)
        return self

    def status(self) -> dict[str, Any]:
        """What ``achilles.getClusterStatus`` says about this cluster."""
        from achilles import getClusterStatus

        return getClusterStatus(host=HOST, port=self.port, secret_key=self.secret)

    def node_count(self) -> int:
        """How many nodes the server lists now."""
        return len(self.status()["nodes"])

    def node_pids(self) -> set[int]:
        """PIDs of the registered nodes (each says its own, once connected)."""
        return {n["pid"] for n in self.status()["nodes"] if n.get("pid")}

    def wait_nodes(self, timeout: float = 60.0) -> None:
        """Wait until exactly the live nodes started here are registered (no stale ones)."""
        want = {n.pid for n in self.nodes if n.alive()}
        wait_until(
            lambda: self.node_pids() == want,
            timeout,
            0.1,
            f"{len(want)} node(s) to be registered",
            alive=lambda: self.server is not None and self.server.alive(),
        )

    def kwargs(self) -> dict[str, Any]:
        """``host``, ``port`` and ``secret_key`` for ``achilles.Pool(**kwargs)``."""
        return {"host": HOST, "port": self.port, "secret_key": self.secret}

    def processes(self) -> list[Proc]:
        """The nodes, then the server: the order they are stopped in."""
        return [*self.nodes, *([self.server] if self.server else [])]

    def stop(self) -> None:
        """Stop every process by PID; remove the temporary directory if it made one."""
        for proc in self.processes():
            proc.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(nodes: int = 2, processes: int = 1, **options: Any) -> Cluster:
    """A running :class:`Cluster` of ``nodes`` nodes with ``processes`` workers each.

    ``options`` go to :class:`Cluster`. Use it as a context manager to stop it. If it
    cannot start, whatever it started is stopped before the error propagates.
    """
    cluster = Cluster(**options)
    try:
        return cluster.start(nodes, processes)
    except BaseException:
        cluster.stop()
        raise
