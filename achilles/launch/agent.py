"""The host's side of ``achilles up``: run there as ``python -m achilles.launch.agent``
over SSH, from the private environment ``up`` installed.

``start`` reads its orders as one JSON line on stdin (the secret with them: it never
appears on a command line, and no file keeps it), starts a node detached from the SSH
session (its own session, ``node.log`` and ``node.pid`` in a private directory), prints
``{"event": "started", ...}`` and then stays until the controller closes stdin (the
server has seen the node) or the node exits (``{"event": "exited", "log": ...}``).
``stop`` drains a node (SIGTERM: finish the chunks in hand) or, with ``--now``, stops it;
``logs`` prints (or follows) its log.

Everything here runs on the host: standard library and this package only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from achilles.protocol.auth import safe_name

#: settings ``up`` passes on to the node (``ACHILLES_<KEY>``); the secret among them
PASSED = ("host", "port", "tls", "username", "secret_key", "heartbeat_interval", "name")
#: the log lines shown when a node fails
TAIL = 20


def state_home() -> Path:
    """``~/.local/state/achilles`` (or under ``$XDG_STATE_HOME``): what achilles keeps
    of the nodes ``up`` started, on either side."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "achilles"


def state_root() -> Path:
    return state_home() / "nodes"


def node_dir(name: str) -> Path:
    if safe_name(name) != name:
        raise SystemExit(f"bad node name {name!r}")
    return state_root() / name


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def tail(path: Path, lines: int = TAIL) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


def running(name: str) -> int:
    """The pid of node ``name`` started here, if it still runs (checked against its
    command line: a pid file can outlive its process and the pid be reused)."""
    try:
        pid = int((node_dir(name) / "node.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return 0
    return pid if b"achilles" in argv and name.encode() in argv else 0


def _stop(pid: int, now: bool, timeout: float) -> bool:
    """SIGTERM (drain) or, ``now``, SIGTERM twice then SIGKILL to its process group after
    a few seconds; True once the process is gone."""
    os.kill(pid, signal.SIGTERM)
    if now:
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)  # the second one: stop at once
    deadline = time.monotonic() + (min(timeout, 10.0) if now else timeout)
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    if now:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        return True
    return False


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (one that exited but is not reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmd_start(args: argparse.Namespace) -> int:
    orders = json.loads(sys.stdin.readline())
    name = safe_name(str(orders["name"]))
    home = node_dir(name)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    settings = {k: orders["settings"][k] for k in PASSED if orders["settings"].get(k) is not None}
    settings["name"] = name
    fingerprint = json.dumps({k: v for k, v in settings.items() if k != "secret_key"})
    pid = running(name)
    if pid and (home / "config").exists() and (home / "config").read_text() == fingerprint:
        _emit(event="started", pid=pid, reused=True, **_facts())
        return _watch(None, home)
    if pid:
        _stop(pid, now=True, timeout=10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env.update({f"ACHILLES_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "achilles", "node", "--launched-by", "up", "--name", name]
    if orders.get("processes"):
        argv += ["--processes", str(int(orders["processes"]))]
    fd = os.open(home / "node.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, f"--- started by achilles up at {time.strftime('%F %T')}\n".encode())
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=fd,
        stderr=subprocess.STDOUT,
        cwd=home,
        env=env,
        start_new_session=True,  # SSH's hang-up never reaches it
    )
    os.close(fd)
    (home / "node.pid").write_text(f"{proc.pid}\n")
    (home / "config").write_text(fingerprint)
    _emit(event="started", pid=proc.pid, reused=False, **_facts())
    return _watch(proc, home)


def _facts() -> dict[str, Any]:
    from achilles import __version__

    return dict(cores=os.cpu_count() or 1, python=platform.python_version(), version=__version__)


def _watch(proc: subprocess.Popen[bytes] | None, home: Path) -> int:
    """Until stdin closes (the controller has what it needs) or the node exits."""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready and not sys.stdin.readline():
            return 0
        if proc is not None and proc.poll() is not None:
            _emit(event="exited", code=proc.returncode, log=tail(home / "node.log"))
            (home / "node.pid").unlink(missing_ok=True)
            return 1


def cmd_stop(args: argparse.Namespace) -> int:
    pid = running(args.name)
    if not pid:
        (node_dir(args.name) / "node.pid").unlink(missing_ok=True)
        _emit(event="stopped", pid=None, note="not running")
        return 0
    gone = _stop(pid, args.now, args.timeout)
    if gone:
        (node_dir(args.name) / "node.pid").unlink(missing_ok=True)
    _emit(event="stopped" if gone else "draining", pid=pid)
    return 0 if gone else 1


def cmd_logs(args: argparse.Namespace) -> int:
    path = node_dir(args.name) / "node.log"
    if not path.exists():
        print(f"no log for node {args.name} on this host", file=sys.stderr)
        return 1
    for line in tail(path, args.lines):
        print(line)
    if not args.follow:
        return 0
    sys.stdout.flush()
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            # the controller's ssh went away: stdin closes, so stop following
            ready, _, _ = select.select([sys.stdin], [], [], 0.5)
            if ready and not os.read(sys.stdin.fileno(), 1024):
                return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m achilles.launch.agent")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("start")
    s = sub.add_parser("stop")
    s.add_argument("--name", required=True)
    s.add_argument("--now", action="store_true")
    s.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("logs")
    s.add_argument("--name", required=True)
    s.add_argument("-n", "--lines", type=int, default=50)
    s.add_argument("-f", "--follow", action="store_true")
    args = p.parse_args(argv)
    commands = {"start": cmd_start, "stop": cmd_stop, "logs": cmd_logs}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
