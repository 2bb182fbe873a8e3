"""Which hosts ``achilles up`` starts nodes on: ``[user@]host[:port][ processes]``.

On the command line a host is one argument (``user@host:2222/4`` gives 4 processes; a
space works too when quoted); a hosts file has one host a line, ``#`` comments and blank
lines allowed. IPv6 addresses go in brackets: ``[fe80::1]:22``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from achilles.errors import ConfigError
from achilles.protocol.auth import safe_name

_HOST = re.compile(
    r"""^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]{0,63})@)?
        (?:\[(?P<v6>[0-9A-Fa-f:.%A-Za-z]{2,64})\]|(?P<host>[A-Za-z0-9][A-Za-z0-9._-]{0,252}))
        (?::(?P<port>[0-9]{1,5}))?
        (?:(?:/|\s+)(?P<processes>[0-9]{1,6}))?$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Host:
    """One host to start a node on, as the user named it."""

    host: str
    user: str | None = None
    port: int | None = None  # SSH port (None: the SSH configuration's)
    processes: int | None = None  # worker processes (None: every core)

    @property
    def name(self) -> str:
        """The node's name in the cluster: the host as the user wrote it."""
        return safe_name(self.host)

    @property
    def target(self) -> str:
        """What ``ssh`` is given (the port goes with ``-p``)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return self.name


def parse(spec: str, where: str = "host") -> Host:
    """``[user@]host[:port][/processes]`` (or a space before processes).

    Raises:
        ConfigError: naming ``where`` and what is wrong.
    """
    m = _HOST.match(spec.strip())
    if not m:
        raise ConfigError(
            f"{where}: {spec.strip()[:80]!r} is not [user@]host[:port][/processes] "
            f"(for example alice@node1:22/8)"
        )
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{where}: SSH port {port} is not 1-65535")
    processes = int(m["processes"]) if m["processes"] else None
    if processes is not None and processes < 1:
        raise ConfigError(f"{where}: processes must be at least 1")
    return Host(m["v6"] or m["host"], m["user"], port, processes)


def read_file(path: str) -> list[Host]:
    """The hosts of a hosts file: one a line, ``#`` starts a comment."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read hosts file {path}: {exc.strerror}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            hosts.append(parse(text, f"{path}:{number}"))
    return hosts


def unique(hosts: list[Host]) -> list[Host]:
    """The hosts, each node name once (a name is a node's directory on its host)."""
    seen: dict[str, Host] = {}
    for h in hosts:
        if h.name in seen:
            raise ConfigError(f"host {h.name} is named twice")
        seen[h.name] = h
    return list(seen.values())
