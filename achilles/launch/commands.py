"""The command line of ``achilles up``, ``down`` and ``logs`` (added to
:mod:`achilles.cli`'s parser)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from achilles.config import Settings
from achilles.errors import AchillesError

if TYPE_CHECKING:
    from achilles.launch import up as _up
    from achilles.launch.hosts import Host


def _ssh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accept-new-host-keys",
        action="store_true",
        help="trust hosts whose key is not in known_hosts yet (SSH's accept-new); "
        "changed keys are still refused",
    )
    p.add_argument(
        "--ssh-config",
        "-F",
        metavar="FILE",
        help="an ssh configuration file to use instead of ~/.ssh/config (ssh -F)",
    )
    p.add_argument(
        "--ssh-option",
        "-o",
        action="append",
        default=[],
        metavar="OPTION",
        help="passed to ssh as -o OPTION (repeatable); ~/.ssh/config applies anyway",
    )


def add_parsers(sub: Any, common: Any) -> None:
    p = sub.add_parser(
        "up",
        help="start a node on each host over SSH (installing achilles there if needed)",
        description="Start one node on each host, over SSH, connected to this cluster's "
        "server; return when the server sees every node. A host needs only SSH and "
        "CPython of this side's minor version: achilles and its dependencies are "
        "installed from wheels sent from here, into ~/.cache/achilles/ on the host.",
    )
    common(p)
    p.add_argument(
        "hosts", nargs="*", metavar="[USER@]HOST[:PORT][/PROCESSES]", help="hosts to start nodes on"
    )
    p.add_argument(
        "--hosts-file",
        action="append",
        default=[],
        metavar="FILE",
        help="one [user@]host[:port][ processes] a line; # comments",
    )
    p.add_argument(
        "--server",
        action="store_true",
        help="also start a server on this machine (bound to --bind) if none is running",
    )
    p.add_argument(
        "--bind", default="0.0.0.0", help="with --server: the address it listens on (0.0.0.0)"
    )
    p.add_argument(
        "--advertise",
        metavar="ADDRESS",
        help="the server's address as the hosts reach it (default: the configured host, "
        "or this machine's address as each host's SSH connection sees it)",
    )
    p.add_argument(
        "--tunnel",
        action="store_true",
        help="nodes reach the server through a reverse SSH forward (only SSH's port needed)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for a node to connect (60)")
    _ssh_args(p)
    p = sub.add_parser("down", help="drain and stop the nodes `achilles up` started")
    common(p)
    p.add_argument("hosts", nargs="*", metavar="HOST", help="the hosts (default: all of them)")
    p.add_argument("--now", action="store_true", help="stop at once (chunks in hand are requeued)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a drain (60)")
    p.add_argument(
        "--server", action="store_true", help="also stop the server `up --server` started"
    )
    _ssh_args(p)
    p = sub.add_parser("logs", help="show the log of a node `achilles up` started")
    p.add_argument("host", metavar="HOST")
    p.add_argument("-f", "--follow", action="store_true", help="follow it")
    p.add_argument("-n", "--lines", type=int, default=50, help="lines to show (50)")
    _ssh_args(p)


def _options(args: argparse.Namespace, settings: Settings) -> _up.Options:
    from achilles.launch import up as _up

    return _up.Options(
        settings=settings,
        tunnel=getattr(args, "tunnel", False),
        advertise=getattr(args, "advertise", None),
        accept_new_host_keys=args.accept_new_host_keys,
        ssh_options=(("-F", args.ssh_config) if args.ssh_config else ())
        + tuple(x for o in args.ssh_option for x in ("-o", o)),
        timeout=getattr(args, "timeout", 60.0),
    )


class Progress:
    """Which hosts are still pending: a line rewritten in place on a terminal, one line
    per change elsewhere."""

    def __init__(self, hosts: list[Host]) -> None:
        self.doing = {h.name: "waiting" for h in hosts}
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def report(self, host: Host, what: str) -> None:
        with self._lock:
            self.doing[host.name] = what
            if not self.tty:
                print(f"  {host.name}: {what}", file=sys.stderr, flush=True)
            else:
                self._draw()

    def done(self, host: Host) -> None:
        with self._lock:
            self.doing.pop(host.name, None)
            if self.tty:
                self._draw()

    def _draw(self) -> None:
        pending = ", ".join(f"{n} ({w})" for n, w in sorted(self.doing.items()))
        line = f"[{time.monotonic() - self.start:5.1f} s] pending: {pending}" if pending else ""
        print(f"\r\x1b[K{line[:200]}", end="", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from achilles.launch import hosts as _hosts
    from achilles.launch import up as _up

    hosts = [_hosts.parse(h) for h in args.hosts]
    for f in args.hosts_file:
        hosts += _hosts.read_file(f)
    hosts = _hosts.unique(hosts)
    if not hosts:
        raise AchillesError("name at least one host (or --hosts-file FILE)")
    if not settings.secret_key:
        raise AchillesError(
            "no cluster secret: set ACHILLES_SECRET_KEY (`achilles secret` makes one) or "
            "write it to .env; it is sent to the hosts over SSH only"
        )
    if args.server:
        _ensure_server(settings, args.bind)
    else:
        _check_server(settings)
    progress = Progress(hosts)
    launcher = _up.Launcher(_options(args, settings), progress.report)
    print(
        f"starting nodes on {len(hosts)} host(s) for the server at {settings.host}:{settings.port}",
        flush=True,
    )

    def done(out: _up.Outcome) -> None:
        progress.done(out.host)
        _print_outcome(out, progress.tty)

    outcomes = launcher.up(hosts, done)
    failed = [o for o in outcomes if not o.ok]
    total = time.monotonic() - progress.start
    print(
        f"{len(outcomes) - len(failed)} of {len(outcomes)} host(s) ready in {total:.1f} s"
        + (f"; failed: {', '.join(o.host.name for o in failed)}" if failed else "")
    )
    return 1 if failed else 0


def _print_outcome(out: _up.Outcome, tty: bool) -> None:
    prefix = "\r\x1b[K" if tty else ""
    print(f"{prefix}{out.host.name}: {out.text} [{out.seconds:.1f} s]", flush=True)
    if out.log:
        print(f"  last lines of its log on {out.host.name}:")
        for line in out.log:
            print(f"  | {_printable(line)}")


def _printable(line: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)[:300]


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from achilles.launch import up as _up

    outcomes = _up.down(args.hosts, _options(args, settings), now=args.now, timeout=args.timeout)
    if not outcomes:
        print("no nodes started by achilles up")
    for out in outcomes:
        print(f"{out.host.name}: {out.text}")
    if args.server:
        print(stop_server())
    return 1 if any(not o.ok for o in outcomes) else 0


def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    from achilles.launch import up as _up

    return _up.logs(args.host, _options(args, settings), lines=args.lines, follow=args.follow)


def _check_server(settings: Settings) -> None:
    """Fail at once, naming the server, when it does not answer."""
    from achilles.launch.up import server_status

    s = settings
    try:
        server_status(s)
    except Exception as exc:
        raise AchillesError(
            f"no answer from the server at {s.host}:{s.port} ({exc}); start one, or pass "
            f"--server to start one on this machine"
        ) from None


def _server_files() -> tuple[Path, Path]:
    from achilles.launch import up as _up

    home = _up.state_file().parent
    return home / "server.pid", home / "server.log"


def _ensure_server(settings: Settings, bind: str) -> None:
    """A server on this machine, started detached unless one answers already."""
    s = settings
    try:
        _check_server(settings)
        print(f"using the server at {s.host}:{s.port}")
        return
    except AchillesError:
        pass  # none there: start one
    pid_file, log_file = _server_files()
    pid_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    env = {**os.environ, "ACHILLES_SECRET_KEY": s.secret_key or "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "achilles", "server", "--host", bind, "--port", str(s.port)],
        stdin=subprocess.DEVNULL,
        stdout=fd,
        stderr=fd,
        env=env,
        start_new_session=True,
    )
    os.close(fd)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace")
        if f"listening on {bind}:{s.port}" in text:  # the server's first line, once bound
            pid_file.write_text(f"{proc.pid}\n")
            print(f"started a server on {bind}:{s.port} (pid {proc.pid}, log {log_file})")
            return
        if proc.poll() is not None:
            last = text.strip().splitlines()[-1:] or ["no output"]
            raise AchillesError(f"the server did not start: {last[0]}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AchillesError("the server did not start within 30 s")


def stop_server() -> str:
    """Stop the server ``up --server`` started (SIGTERM); what happened, in words."""
    from achilles.launch.agent import alive

    pid_file, _ = _server_files()
    try:
        pid = int(pid_file.read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return "server: was not running"
    if b"achilles" not in argv or b"server" not in argv:
        pid_file.unlink(missing_ok=True)
        return "server: was not running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return f"server: stopped (pid {pid})"
