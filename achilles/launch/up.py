"""``achilles up``, ``down`` and ``logs``: nodes on other machines, over SSH.

For each host, in parallel: a probe (one short SSH command: which Pythons, free space,
whether this achilles is installed there already), then, if it is not, the wheels of
this machine's achilles and its dependencies sent over SSH and installed into a private
virtual environment (``~/.cache/achilles/<version>/<digest>/``, ``pip --no-index``), then
the node started detached by :mod:`achilles.launch.agent`, which gets the secret on its
stdin. A host is ready when the **server** lists its node (by name and pid); if the node
exits first, its last log lines are the reason. Which hosts ``up`` started is kept in
``~/.local/state/achilles/up.json`` (no secret in it), for ``down`` and ``logs``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import achilles
from achilles.config import Settings, is_loopback
from achilles.errors import AchillesError
from achilles.launch import agent, wheels
from achilles.launch.hosts import Host
from achilles.launch.ssh import Ssh, SshError

#: the probe, run by the host's ``sh``: facts as ``key=value`` lines
PROBE = r"""
want="$1"; env="$2"
echo "ssh=${SSH_CONNECTION:-}"
facts='import os, sys, platform
s = os.statvfs(os.path.expanduser("~"))
print("%d.%d.%d" % sys.version_info[:3], platform.python_implementation(),
      s.f_bavail * s.f_frsize // 1024)'
for c in "python$want" python3 python; do
  p=$(command -v "$c" 2>/dev/null) || continue
  v=$("$p" -c "$facts" 2>/dev/null) || continue
  echo "python=$p $v"
done
if [ -f "$env/.complete" ] && "$env/bin/python" -c "import achilles" 2>/dev/null; then
  echo "installed=yes"
fi
"""

#: the installer, run by the host's Python with the wheels as a tar on stdin
INSTALL = r"""
import os, shutil, subprocess, sys, tarfile
env, spec = sys.argv[1], sys.argv[2]
wh = env + ".wheels"
shutil.rmtree(wh, ignore_errors=True)
os.makedirs(wh, mode=0o700)
try:
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as t:
        for m in t:
            if not m.isfile() or "/" in m.name or m.name.startswith("."):
                sys.exit("achilles up: unexpected file in the wheel archive: %r" % m.name)
            with open(os.path.join(wh, m.name), "wb") as f:
                shutil.copyfileobj(t.extractfile(m), f)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", env], check=True)
    pip = os.path.join(wh, [w for w in os.listdir(wh) if w.startswith("pip-")][0], "pip")
    subprocess.run([os.path.join(env, "bin", "python"), pip, "install", "--no-index",
        "--find-links", wh, "--quiet", "--disable-pip-version-check",
        "--no-warn-script-location", spec], check=True)
    open(os.path.join(env, ".complete"), "w").close()
except OSError as exc:
    sys.exit("achilles up: install failed: %s" % exc)
except subprocess.CalledProcessError as exc:
    sys.exit("achilles up: install failed: %s exited with %d" % (exc.cmd[1], exc.returncode))
finally:
    shutil.rmtree(wh, ignore_errors=True)
"""

#: MiB a host needs free beyond the installed environment (logs, the wheels in transit)
HEADROOM_MIB = 50


class HostFailed(Exception):
    """This host could not be made ready: ``reason`` (a few words) and details."""

    def __init__(self, reason: str, detail: str = "", log: Iterable[str] = ()) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.log = list(log)


@dataclass
class Outcome:
    host: Host
    ok: bool
    text: str  # "ready (...)" or the reason it failed
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0
    installed: bool = False


@dataclass
class Options:
    """How ``up`` reaches hosts and where its nodes connect."""

    settings: Settings
    tunnel: bool = False
    advertise: str | None = None  # the server's address as the hosts reach it
    accept_new_host_keys: bool = False
    ssh_options: tuple[str, ...] = ()
    timeout: float = 60.0  # seconds for a node to connect once started


# -- state on this machine (no secret) -------------------------------------------------
def state_file() -> Path:
    return agent.state_home() / "up.json"


_state_lock = threading.Lock()


def load_state() -> dict[str, Any]:
    try:
        data = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _update_state(change: Callable[[dict[str, Any]], None]) -> None:
    with _state_lock:
        data = load_state()
        change(data)
        path = state_file()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)


# -- the server's view ------------------------------------------------------------------
def server_status(s: Settings) -> dict[str, Any]:
    """The status of the server ``s`` names (see ``achilles.getClusterStatus``)."""
    from achilles.admin import getClusterStatus

    return getClusterStatus(
        host=s.host, port=s.port, username=s.username, secret_key=s.secret_key,
        tls_ca=s.tls_ca, tls=s.tls,
    )  # fmt: skip


class ServerWatch:
    """Polls the server's status twice a second while hosts wait for their nodes; one
    connection's worth of work for all hosts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: dict[tuple[str, int], dict[str, Any]] = {}
        self.error = ""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="achilles-up-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        s = self.settings
        while not self._stop.is_set():
            try:
                status = server_status(s)
                seen = {(n.get("name"), n.get("pid")): n for n in status["nodes"]}
                error = ""
            except Exception as exc:  # shown to the user as it is
                seen, error = {}, f"cannot ask the server at {s.host}:{s.port}: {exc}"
            with self._cond:
                self.seen, self.error = seen, error
                self._cond.notify_all()
            self._stop.wait(0.5)

    def wait_for(
        self, name: str, pid: int, timeout: float, alive: Callable[[], str]
    ) -> dict[str, Any]:
        """The server's entry for node ``name`` with ``pid``, once it lists it.

        Raises:
            HostFailed: ``alive()`` said the node is gone, or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while (name, pid) not in self.seen:
                gone = alive()
                if gone:
                    raise HostFailed("node exited", gone)
                left = deadline - time.monotonic()
                if left <= 0:
                    why = self.error or "the server does not list it"
                    raise HostFailed(
                        "node not connected",
                        f"started (pid {pid}) but not connected within {timeout:.0f} s "
                        f"({why}; a firewall between the host and the server? try --tunnel)",
                    )
                self._cond.wait(min(left, 0.5))
            return self.seen[(name, pid)]

    def stop(self) -> None:
        self._stop.set()


# -- one host ---------------------------------------------------------------------------
def _facts(text: str) -> dict[str, list[str]]:
    facts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            facts.setdefault(key, []).append(value.strip())
    return facts


def _free_mib(facts: dict[str, list[str]]) -> int:
    """Free space in the host's home directory, as its first Python measured it."""
    for entry in facts.get("python", []):
        parts = entry.split()
        if len(parts) == 4 and parts[3].isdigit():
            return int(parts[3]) // 1024
    return 0


def _want() -> str:
    return "%d.%d" % sys.version_info[:2]


def _pick_python(facts: dict[str, list[str]]) -> str:
    """The host's CPython of this side's minor version.

    Raises:
        HostFailed: there is none (naming what there is).
    """
    found = []
    for entry in facts.get("python", []):
        path, version, impl = (entry.split() + ["", "", ""])[:3]
        if impl == "CPython" and version.rsplit(".", 1)[0] == _want():
            return path
        found.append(f"{impl} {version} ({path})")
    if not found:
        raise HostFailed("no Python 3", f"no python3 on the host's PATH; install CPython {_want()}")
    raise HostFailed(
        "wrong Python version",
        f"found {', '.join(found)}; this side runs CPython {_want()} and the host needs the "
        f"same minor version (python{_want()})",
    )


class Launcher:
    def __init__(self, options: Options, report: Callable[[Host, str], None]) -> None:
        self.options = options
        self.report = report  # progress: (host, what it is doing now)
        self.house: wheels.Wheelhouse | None = None
        self._house_lock = threading.Lock()
        self.digest = wheels.digest()
        self.env_dir = f".cache/achilles/{achilles.__version__}/{self.digest}"
        self.watch: ServerWatch | None = None

    def wheelhouse(self) -> wheels.Wheelhouse:
        with self._house_lock:
            if self.house is None:
                self.house = wheels.build()
            return self.house

    def up(
        self, hosts: list[Host], done: Callable[[Outcome], None] = lambda o: None
    ) -> list[Outcome]:
        """Every host in parallel; ``done`` is called with each outcome as it comes."""

        def one(host: Host) -> Outcome:
            outcome = self._one(host)
            done(outcome)
            return outcome

        self.watch = ServerWatch(self.options.settings)
        try:
            with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
                return list(pool.map(one, hosts))
        finally:
            self.watch.stop()

    def _one(self, host: Host) -> Outcome:
        start = time.monotonic()
        outcome = Outcome(host, False, "")
        try:
            ssh = Ssh(
                host,
                self.options.ssh_options,
                accept_new_host_keys=self.options.accept_new_host_keys,
            )
        except SshError as exc:
            outcome.text = str(exc)
            return outcome
        try:
            outcome.text, outcome.installed = self._launch(ssh, host)
            outcome.ok = True
        except SshError as exc:
            outcome.text = str(exc)
        except HostFailed as exc:
            outcome.text, outcome.log = str(exc), exc.log
        finally:
            ssh.close()
            outcome.seconds = time.monotonic() - start
        return outcome

    def _launch(self, ssh: Ssh, host: Host) -> tuple[str, bool]:
        self.report(host, "connecting")
        env = f"$HOME/{self.env_dir}"
        probe = ssh.run(f'sh -s -- {_want()} "{env}"', stdin=PROBE.encode(), timeout=60)
        facts = _facts(probe.stdout.decode("utf-8", "replace"))
        python = _pick_python(facts)
        installed = "yes" in facts.get("installed", [])
        free_mib = _free_mib(facts)
        if not installed:
            house = self.wheelhouse()
            need = house.size() * 4 // 2**20 + HEADROOM_MIB
            if free_mib < need:
                raise HostFailed(
                    "no disk space", f"{free_mib} MiB free in the home directory, {need} MiB needed"
                )
            self.report(host, f"installing achilles {achilles.__version__}")
            done = ssh.run(
                f"{python} -c {_q(INSTALL)} \"{env}\" 'achilles[tls]=={achilles.__version__}'",
                stdin=house.tar(),
                timeout=600,
            )
            if done.returncode:
                raise HostFailed("install failed", _last(done.stderr))
        elif free_mib < HEADROOM_MIB // 5:
            raise HostFailed("no disk space", f"{free_mib} MiB free in the home directory")
        target = self._target(ssh, facts)
        tunnel_pid = None
        if self.options.tunnel:
            self.report(host, "opening the tunnel")
            tunnel_pid, port = _open_tunnel(ssh, self.options.settings)
            target = ("127.0.0.1", port)
        self.report(host, "starting the node")
        record = dict(
            target=host.target,
            port=host.port,
            env=f"{self.env_dir}/bin/python",
            tunnel_pid=tunnel_pid,
            server=f"{target[0]}:{target[1]}",
        )
        try:
            info = self._start(ssh, host, env, target)
        except BaseException:
            if tunnel_pid:
                _kill(tunnel_pid)
            raise
        record["pid"] = info["pid"]
        _update_state(lambda s: s.setdefault("nodes", {}).__setitem__(host.name, record))
        return (
            f"ready ({info['slots']} processes of {info['cores']} cores, Python "
            f"{info['python']}, achilles {info['version']}"
            f"{', installed' if not installed else ''}{', reused' if info['reused'] else ''}"
            f"{', via SSH tunnel' if tunnel_pid else ''})",
            not installed,
        )

    def _target(self, ssh: Ssh, facts: dict[str, list[str]]) -> tuple[str, int]:
        """Where the host's node connects: ``--advertise``, the configured server if it is
        not loopback, else this machine as the host sees it (its SSH connection's
        source address)."""
        s = self.options.settings
        if self.options.advertise:
            return self.options.advertise, s.port
        if not is_loopback(s.host) and s.host not in ("0.0.0.0", "::"):
            return s.host, s.port
        seen = (facts.get("ssh") or [""])[-1].split()
        if not seen:
            raise HostFailed(
                "no server address", "cannot tell this machine's address: pass --advertise ADDR"
            )
        return seen[0], s.port

    def _start(self, ssh: Ssh, host: Host, env: str, target: tuple[str, int]) -> dict[str, Any]:
        s = self.options.settings
        orders = {
            "name": host.name,
            "processes": host.processes,
            "settings": {
                "host": target[0],
                "port": target[1],
                "tls": s.tls,
                "username": s.username,
                "secret_key": s.secret_key,
                "heartbeat_interval": s.heartbeat_interval,
            },
        }
        proc = ssh.popen(
            f'"{env}/bin/python" -m achilles.launch.agent start',
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=_read_events, args=(proc.stdout, lines), daemon=True).start()
        try:
            proc.stdin.write(json.dumps(orders).encode() + b"\n")
            proc.stdin.flush()
            started = lines.get(timeout=60)
            if started is None or started.get("event") != "started":
                raise HostFailed(
                    "node did not start", _last(proc.stderr.read() if proc.stderr else b"")
                )
            exited: list[dict[str, Any]] = []

            def gone() -> str:
                while not lines.empty():
                    event = lines.get_nowait()
                    if event and event.get("event") == "exited":
                        exited.append(event)
                if exited:
                    return f"exit status {exited[0]['code']}"
                return ""

            self.report(host, "waiting for the server to see the node")
            assert self.watch is not None
            try:
                node = self.watch.wait_for(host.name, started["pid"], self.options.timeout, gone)
            except HostFailed as exc:
                if exited:
                    exc.log = exited[0].get("log", [])
                raise
            return {**started, "slots": node.get("slots", "?")}
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _read_events(stream: Any, out: queue.Queue[dict[str, Any] | None]) -> None:
    for raw in stream:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.put(event)
    out.put(None)


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _last(stderr: bytes, lines: int = 3) -> str:
    text = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return " | ".join(text[-lines:])[:500] or "no message"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass


def _open_tunnel(ssh: Ssh, settings: Settings) -> tuple[int, int]:
    """A reverse forward from a port on the host to the server (``ssh -R 0:...``), in an
    ssh process of its own that outlives this command; (its pid, the host's port)."""
    log = state_file().parent / f"tunnel-{ssh.host.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    server = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    argv = ssh.argv("", share=False)
    argv[1:1] = ["-N", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO"]
    argv[1:1] = ["-R", f"0:{server}:{settings.port}"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
    )
    os.close(fd)
    deadline = time.monotonic() + ssh.connect_timeout + 10
    while time.monotonic() < deadline:
        m = re.search(r"Allocated port (\d+) for remote forward", log.read_text(errors="replace"))
        if m:
            return proc.pid, int(m.group(1))
        if proc.poll() is not None:
            raise HostFailed("tunnel failed", _last(log.read_bytes()))
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise HostFailed("tunnel failed", "ssh -R gave no port (AllowTcpForwarding off on the host?)")


# -- down and logs ------------------------------------------------------------------------
def started_hosts(names: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The nodes ``up`` started (all, or those named).

    Raises:
        AchillesError: a name ``up`` did not start.
    """
    nodes = load_state().get("nodes", {})
    names = list(names)
    unknown = [n for n in names if n not in nodes]
    if unknown:
        raise AchillesError(
            f"achilles up did not start a node on {', '.join(unknown)} "
            f"(known: {', '.join(sorted(nodes)) or 'none'})"
        )
    return {n: nodes[n] for n in (names or sorted(nodes))}


def _ssh_for(record: dict[str, Any], options: Options) -> Ssh:
    target = str(record["target"])
    user, _, host = target.rpartition("@")
    return Ssh(
        Host(host, user or None, record.get("port")),
        options.ssh_options,
        accept_new_host_keys=options.accept_new_host_keys,
    )


def down(
    names: Iterable[str], options: Options, now: bool = False, timeout: float = 60.0
) -> list[Outcome]:
    """Drain (or, ``now``, stop) nodes ``up`` started; forget them once stopped."""
    records = started_hosts(names)

    def one(item: tuple[str, dict[str, Any]]) -> Outcome:
        name, record = item
        ssh = _ssh_for(record, options)
        out = Outcome(Host(name), False, "")
        try:
            argv = [record["env"], "-m", "achilles.launch.agent", "stop", "--name", name]
            argv += ["--timeout", str(timeout)] + (["--now"] if now else [])
            done = ssh.run(f'"$HOME/{record["env"]}" ' + " ".join(argv[1:]), timeout=timeout + 30)
            events = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith(b"{")]
            event = events[-1] if events else {}
            if event.get("event") == "stopped":
                out.ok = True
                out.text = "stopped" if event.get("pid") else "was not running"
            else:
                out.text = f"still finishing its chunks after {timeout:.0f} s (use --now)"
        except SshError as exc:
            out.text = str(exc)
        finally:
            ssh.close()
        if out.ok:
            if record.get("tunnel_pid"):
                _kill(int(record["tunnel_pid"]))
            _update_state(lambda s: s.get("nodes", {}).pop(name, None))
        return out

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(records)))) as pool:
        return list(pool.map(one, records.items()))


def logs(name: str, options: Options, lines: int = 50, follow: bool = False) -> int:
    """Print node ``name``'s log (``follow``: until interrupted); the exit status."""
    record = started_hosts([name])[name]
    ssh = _ssh_for(record, options)
    argv = f'"$HOME/{record["env"]}" -m achilles.launch.agent logs --name {name} -n {int(lines)}'
    try:
        proc = ssh.popen(argv + (" -f" if follow else ""), stdin=subprocess.PIPE)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return 130
    finally:
        ssh.close()
