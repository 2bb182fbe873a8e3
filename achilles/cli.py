"""Command line: ``achilles server|node|kill|status|secret`` (and the
``achilles-server`` / ``achilles-node`` scripts). Errors go to stderr with a non-zero
exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from achilles.config import Settings, resolve
from achilles.errors import AchillesError
from achilles.launch import commands as _launch_commands

#: the levels ``--log-level`` and ACHILLES_LOG_LEVEL take
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _common(p: argparse.ArgumentParser, secret: bool = True, server: bool = False) -> None:
    """The options every command shares; a server has no client-only ones (``--tls-ca``,
    ``--username``) and its ``--host`` is the address it listens on."""
    _version_option(p)
    if server:
        p.add_argument(
            "--host",
            help="address to listen on (bind address; 0.0.0.0 for every interface) "
            "(ACHILLES_HOST; default 127.0.0.1)",
        )
    else:
        p.add_argument("--host", help="server address (ACHILLES_HOST; default 127.0.0.1)")
        p.add_argument(
            "--tls-ca",
            dest="tls_ca",
            help="PEM CA certificate to verify the server with; turns TLS on (ACHILLES_TLS_CA)",
        )
    p.add_argument(
        "--tls",
        choices=("auto", "on", "off"),
        help="TLS: auto (default: TLS unless on loopback), on, or off (plain "
        "TCP; a server then accepts it from other machines too) "
        "(ACHILLES_TLS)",
    )
    p.add_argument(
        "--port",
        type=int,
        help=f"port to {'listen on' if server else 'connect to'} (ACHILLES_PORT; default 9999)",
    )
    if not server:
        p.add_argument("--username", help="name to log in as (ACHILLES_USERNAME; default achilles)")
    if secret:
        p.add_argument(
            "--secret-key",
            dest="secret_key",
            help="cluster secret (ACHILLES_SECRET_KEY; prefer it or .env: a "
            "command line is visible to every user in `ps`)",
        )
    p.add_argument(
        "--log-level",
        dest="log_level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING or ERROR (ACHILLES_LOG_LEVEL; default INFO)",
    )


def _version_option(p: argparse.ArgumentParser) -> None:
    from achilles import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="achilles",
        description=("Distributed multiprocessing.Pool: run a server, nodes, or manage a cluster."),
    )
    _version_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    _server_options(
        sub.add_parser("server", help="run the server nodes and controllers connect to")
    )
    _node_options(
        sub.add_parser("node", help="run a node: all cores of this machine work for the cluster")
    )
    _more_parsers(sub)
    return parser


def _server_options(p: argparse.ArgumentParser) -> None:
    _common(p, server=True)
    p.add_argument(
        "--tls-cert", dest="tls_cert", help="PEM certificate: serve TLS (ACHILLES_TLS_CERT)"
    )
    p.add_argument("--tls-key", dest="tls_key", help="PEM private key (ACHILLES_TLS_KEY)")
    p.add_argument(
        "--insecure-loopback",
        dest="insecure",
        action="store_true",
        default=None,
        help="run without a secret, on a loopback address only (ACHILLES_INSECURE)",
    )
    p.add_argument(
        "--dashboard",
        help="where the live web dashboard listens: [HOST:]PORT or off (ACHILLES_DASHBOARD; "
        "default 127.0.0.1:8999; off loopback it asks for the secret)",
    )
    _unit_option(p)


def _node_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--processes",
        type=int,
        help="worker processes (ACHILLES_PROCESSES; default: all cores)",
    )
    p.add_argument(
        "--name", help="this node's name in `achilles status` (ACHILLES_NAME; default: host name)"
    )
    p.add_argument("--launched-by", dest="launched_by", default="", help=argparse.SUPPRESS)
    _unit_option(p)


def _more_parsers(sub: Any) -> None:
    p = sub.add_parser("kill", help="stop every node of the cluster")
    _common(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = sub.add_parser("status", help="show the cluster's nodes and jobs")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    _version_option(
        sub.add_parser("secret", help="print a new strong secret for ACHILLES_SECRET_KEY")
    )
    p = sub.add_parser("dashboard", help="open the server's live web dashboard in a browser")
    _common(p)
    p.add_argument("--dashboard", help="the dashboard's [HOST:]PORT (ACHILLES_DASHBOARD)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p.add_argument(
        "--share",
        action="store_true",
        help="print a read-only link with the share token (needs the secret)",
    )
    _launch_commands.add_parsers(sub, _common)


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    keys = (
        "host",
        "port",
        "username",
        "secret_key",
        "processes",
        "name",
        "log_level",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "insecure",
        "tls",
        "dashboard",
    )
    if getattr(args, "secret_key", None):
        print(
            "achilles: warning: a secret on the command line is visible to every user of "
            "this machine (ps); use ACHILLES_SECRET_KEY or a .env file",
            file=sys.stderr,
        )
    return resolve(**{k: getattr(args, k, None) for k in keys}, **extra)


def _logging(level: str) -> None:
    if level.upper() not in LOG_LEVELS:
        raise AchillesError(
            f"unknown log level {level[:20]!r} (ACHILLES_LOG_LEVEL): use one of "
            + ", ".join(LOG_LEVELS)
        )
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _listening(port: Any) -> None:
    host = port.getHost()
    print(f"listening on {host.host}:{host.port}", flush=True)


def _unit_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--print-systemd-unit",
        dest="print_unit",
        action="store_true",
        help="print a systemd unit that runs this command as a service, and exit",
    )


#: options a systemd unit carries over from the command line (never the secret: the unit
#: reads it from its 0600 environment file)
_UNIT_OPTIONS = ("host", "port", "processes", "name", "tls", "tls_ca", "tls_cert", "tls_key",
                 "username", "log_level")  # fmt: skip


def _print_unit(args: argparse.Namespace) -> int:
    from achilles.launch.systemd import unit

    if getattr(args, "secret_key", None):
        raise AchillesError(
            "a unit never carries the secret: put ACHILLES_SECRET_KEY in its environment file"
        )
    argv: list[str] = []
    for key in _UNIT_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    print(unit(args.command, argv), end="")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    if args.print_unit:
        return _print_unit(args)
    sys.setswitchinterval(0.0005)
    from achilles.net.reactor import reactor as global_reactor

    reactor = global_reactor()

    from achilles import server

    settings = _settings(args)
    if not settings.secret_key and not settings.insecure:
        raise AchillesError(
            "the server needs a secret: set ACHILLES_SECRET_KEY (or write "
            ".env with achilles.genConfig); or, for a loopback-only test "
            "server, pass --insecure-loopback"
        )
    _logging(settings.log_level)
    listening = _listen(server, settings, reactor)
    _dashboard(listening, settings, reactor)  # before the line that says it is ready
    _listening(listening)
    reactor.run()
    return 0


def _dashboard(listening: Any, settings: Settings, reactor: Any) -> None:
    """The server's web dashboard (a warning, not a failure, if its port is taken)."""
    from achilles.web import site

    board = site.start(listening.factory.plain, settings, settings.dashboard, reactor)
    if board is not None:
        print(f"dashboard on {board.url}", flush=True)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Print the dashboard's URL and open it in a browser."""
    import webbrowser

    from achilles.web import site

    settings = _settings(args)
    url = site.dashboard_url(settings)
    if url is None:
        raise AchillesError("the dashboard is off (ACHILLES_DASHBOARD / --dashboard)")
    if args.share:
        if not settings.secret_key:
            raise AchillesError("--share needs the cluster secret (ACHILLES_SECRET_KEY)")
        url += f"?token={site.share_token(settings.secret_key)}"
    print(url)
    if not args.no_browser:
        webbrowser.open(url)
    return 0


def _listen(server: Any, settings: Settings, reactor: Any) -> Any:
    """``server.listen``, with a port it cannot have said in one line."""
    import errno

    from twisted.internet.error import CannotListenError

    try:
        return server.listen(settings, reactor)
    except CannotListenError as exc:
        where = f"{settings.host}:{settings.port}"
        code = getattr(exc.socketError, "errno", None)
        if code == errno.EADDRINUSE:
            why = "the port is in use (another server running? choose another with --port)"
        elif code == errno.EADDRNOTAVAIL:
            why = (
                f"{settings.host} is not an address of this machine (--host is the "
                "address to listen on: one of this machine's, or 0.0.0.0 for all)"
            )
        elif code == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges)"
        else:
            why = str(exc.socketError)
        raise AchillesError(f"cannot listen on {where}: {why}") from None


def _early_worker_start() -> None:
    """Start the pool's fork server first: it loads in parallel with Twisted."""
    sys.setswitchinterval(0.0005)  # reactor and pool threads hand work over quickly
    from achilles.node import worker as _worker

    _worker.context()


def cmd_node(args: argparse.Namespace) -> int:
    if args.print_unit:
        return _print_unit(args)
    _early_worker_start()
    from achilles import node

    settings = _settings(args)
    _logging(settings.log_level)
    if settings.processes is not None and settings.processes < 1:
        raise AchillesError("--processes must be at least 1")
    return node.run_node(settings, launcher=args.launched_by)


def _admin_args(args: argparse.Namespace) -> dict[str, Any]:
    s = _settings(args)
    return dict(
        host=s.host,
        port=s.port,
        username=s.username,
        secret_key=s.secret_key,
        tls_ca=s.tls_ca,
        tls=s.tls,
    )


def cmd_secret(args: argparse.Namespace) -> int:
    """A new secret: 32 random bytes, URL-safe (about 256 bits)."""
    import secrets

    print(secrets.token_urlsafe(32))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from achilles.pool import killCluster

    admin = _admin_args(args)
    if not args.yes:
        where = f"{admin['host']}:{admin['port']}"
        if sys.stdin is None or not sys.stdin.isatty():
            raise AchillesError(
                f"stopping every node of the cluster at {where} needs confirmation, and "
                "there is no terminal to ask on: use --yes"
            )
        try:
            answer = input(f"achilles: stop every node of the cluster at {where}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("achilles kill: cancelled; no node was told to stop", file=sys.stderr)
            return 1
    n = killCluster(command_verified=True, **admin)
    print(f"told {n} node(s) to stop")
    return 0


def _cell(text: Any, width: int) -> str:
    """A name from the server for a table cell: control and other unprintable characters
    escaped (a name must not move the cursor or forge lines), cut to ``width``."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))[:width]


def cmd_status(args: argparse.Namespace) -> int:
    from achilles.pool import getClusterStatus

    status = getClusterStatus(**_admin_args(args))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"{len(status['nodes'])} node(s), {status['controllers']} controller(s), "
        f"{len(status['jobs'])} job(s)"
    )
    print(
        f"{'NODE':<24} {'ADDRESS':<21} {'SLOTS':>5} {'BUSY':>5} {'QUEUED':>6} {'DONE':>8} "
        f"{'HEARTBEAT':>10}  {'STATE':<8} STARTED BY"
    )
    for n in status["nodes"]:
        seen = n.get("last_seen_age")
        busy = n.get("busy", min(n["inflight"], n["slots"]))
        queued = n.get("queued", max(n["inflight"] - n["slots"], 0))
        print(
            f"{_cell(n['name'], 64):<24} {_cell(n.get('address') or '-', 48):<21} "
            f"{n['slots']:>5} {busy:>5} {queued:>6} {n['done']:>8} "
            f"{'-' if seen is None else f'{seen:.1f}s ago':>10}  "
            f"{'leaving' if n['draining'] else 'ready':<8} {_cell(n.get('launcher') or '-', 16)}"
        )
    if status["jobs"]:
        print(
            f"{'JOB':<10} {'FUNCTION':<24} {'OWNER':<24} {'PROGRESS':>14} {'CHUNKS/S':>9} "
            f"{'FLIGHT':>6} {'RETRIES':>7}"
        )
        for j in status["jobs"]:
            total = j["total"] if j["total"] is not None else f"{j['added']}+"
            progress = f"{j['done']}/{total}"
            failed = f"  {j['failed']} failed" if j["failed"] else ""
            print(
                f"{_cell(j['id'], 8):<10} {_cell(j.get('function') or '?', 24):<24} "
                f"{_cell(j['owner'], 24):<24} {progress:>14} "
                f"{j['chunks_per_s']:>9.1f} {j['inflight']:>6} {j['retries']:>7}{failed}"
            )
    return 0


COMMANDS = {
    "server": cmd_server,
    "node": cmd_node,
    "kill": cmd_kill,
    "status": cmd_status,
    "secret": cmd_secret,
    "dashboard": cmd_dashboard,
    "up": lambda args: _launch_commands.cmd_up(args, _settings(args)),
    "down": lambda args: _launch_commands.cmd_down(args, _settings(args)),
    "logs": lambda args: _launch_commands.cmd_logs(args, _settings(args)),
}


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    if parser is None:
        args = _parser().parse_args(argv)
    else:  # achilles-server / achilles-node: one command, named as it was run
        args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (AchillesError, OSError) as exc:
        print(f"achilles {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _script_parser(command: str, add: Any, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"achilles-{command}", description=description)
    add(parser)
    parser.set_defaults(command=command)
    return parser


def server_main() -> None:
    parser = _script_parser(
        "server", _server_options, "Run the achilles server that nodes and controllers connect to."
    )
    sys.exit(main(sys.argv[1:], parser))


def node_main() -> None:
    parser = _script_parser(
        "node", _node_options, "Run an achilles node: this machine's cores work for the cluster."
    )
    sys.exit(main(sys.argv[1:], parser))


def main_entry() -> None:
    sys.exit(main())
