"""Hosts for the launcher's tests: network namespaces joined by a bridge, each host
running a real OpenSSH ``sshd`` on its own address with a host key and a client key made
for the test, and its own home directory (sshd's ``SetEnv``), so that each starts with
nothing of achilles. The controller and the server run in one more namespace.

Every process started here (sshd, the server, the nodes ``achilles up`` starts on the
hosts, tunnels) is stopped by PID when the lab is torn down, whatever the test's outcome.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import Proc, child_env, wait_until

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unavailable() -> str:
    """Why the lab cannot be built here ("" if it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and sshd)"
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists(SSHD):
        return "needs OpenSSH's sshd (Debian: openssh-server; .ci/run installs it)"
    name = f"achk{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode:
        return "cannot create network namespaces (`ip netns add` failed)"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    name: str
    ns: str
    address: str
    home: Path
    sshd: Proc | None = None


@dataclass
class Lab:
    root: Path
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    hosts: dict[str, Host] = field(default_factory=dict)
    _cleanup: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.net = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.ctl = f"achc{self.tag}"
        self.bridge = f"br{self.tag}"
        self._cleanup.append(lambda: subprocess.run(["ip", "netns", "del", self.ctl]))
        ip("netns", "add", self.ctl)
        ip("-n", self.ctl, "link", "set", "lo", "up")
        ip("-n", self.ctl, "link", "add", self.bridge, "type", "bridge")
        ip("-n", self.ctl, "addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        ip("-n", self.ctl, "link", "set", self.bridge, "up")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "id")],
            check=True,
        )
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "hostkey")],
            check=True,
        )
        (self.root / "authorized_keys").write_text((self.root / "id.pub").read_text())
        self.ctl_home = self.root / "ctl-home"
        self.ctl_home.mkdir(mode=0o700)
        self.ssh_config = self.root / "ssh_config"
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.write_text("")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.server: Proc | None = None
        self.port = 0

    # -- hosts ---------------------------------------------------------------------------
    def add_host(
        self,
        name: str,
        *,
        sshd: bool = True,
        keys: bool = True,
        known: bool = True,
        path: str = "/usr/bin:/bin",
        disk_mib: int = 0,
    ) -> Host:
        """A namespace with an address; its sshd (unless ``sshd`` is False), accepting the
        test's key (unless ``keys`` is False), its key in known_hosts (unless ``known``
        is False), the given PATH for its sessions; ``disk_mib``: its home is a file
        system of that size (mounted before its sshd starts, so that sshd sees it)."""
        i = len(self.hosts) + 1
        ns = f"achh{self.tag}{i}"
        outer, inner = f"va{self.tag}{i}", f"vb{self.tag}{i}"
        address = f"{self.net}.{10 + i}"
        self._cleanup.append(lambda: subprocess.run(["ip", "netns", "del", ns]))
        ip("netns", "add", ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", outer, "netns", self.ctl)
        ip("link", "set", inner, "netns", ns)
        ip("-n", self.ctl, "link", "set", outer, "master", self.bridge)
        ip("-n", self.ctl, "link", "set", outer, "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", inner, "up")
        home = self.root / f"home-{name}"
        home.mkdir(mode=0o700)
        if disk_mib:
            size = f"size={disk_mib}m,mode=700"
            subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(home)], check=True)
            self._cleanup.append(lambda: subprocess.run(["umount", "-l", str(home)]))
        host = Host(name, ns, address, home)
        self.hosts[name] = host
        with open(self.ssh_config, "a") as f:
            f.write(
                f"Host {name}\n  HostName {address}\n  User root\n"
                f"  IdentityFile {self.root / 'id'}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.known_hosts}\n  ConnectTimeout 5\n"
            )
        if known:
            with open(self.known_hosts, "a") as f:
                f.write(f"{address} {(self.root / 'hostkey.pub').read_text()}")
        if sshd:
            keyfile = self.root / ("authorized_keys" if keys else "no_keys")
            conf = self.root / f"sshd-{name}.conf"
            conf.write_text(
                f"ListenAddress {address}:22\nHostKey {self.root / 'hostkey'}\n"
                f"AuthorizedKeysFile {keyfile}\nStrictModes no\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\n"
                "PermitRootLogin prohibit-password\nPidFile none\nAllowTcpForwarding yes\n"
                f"SetEnv HOME={home} PATH={path}\nMaxStartups 50\n"
            )
            host.sshd = Proc(
                ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(conf)],
                name=f"sshd-{name}",
            )
            self._cleanup.append(host.sshd.stop)
            wait_until(
                lambda: "Server listening" in host.sshd.output() or not host.sshd.alive(),
                10,
                what=f"sshd on {name}",
            )
        return host

    # -- the server and the controller ---------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        values = dict(
            HOME=str(self.ctl_home),
            ACHILLES_SECRET_KEY=self.secret,
            ACHILLES_HOST="127.0.0.1",
            ACHILLES_PORT=str(self.port),
            ACHILLES_HEARTBEAT_INTERVAL="0.5",
            ACHILLES_HEARTBEAT_TIMEOUT="5",
            PYTHONPATH=TESTS,
        )
        return child_env(**{**values, **extra})

    def start_server(self) -> int:
        self.server = Proc(
            [
                "ip", "netns", "exec", self.ctl, sys.executable, "-m", "achilles", "server",
                "--host", "0.0.0.0", "--port", "0",
            ],
            env=self.env(),
            name="server",
        )  # fmt: skip
        self._cleanup.append(self.server.stop)
        out = wait_until(
            lambda: "listening on 0.0.0.0:" in self.server.output() and self.server.output(),
            20,
            what="server port",
        )
        self.port = int(out.split("listening on 0.0.0.0:")[1].split()[0])
        return self.port

    def achilles(self, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
        """``achilles ARGS`` run in the controller's namespace with the lab's ssh config."""
        ssh = ("-F", str(self.ssh_config)) if args and args[0] in ("up", "down", "logs") else ()
        return subprocess.run(
            ["ip", "netns", "exec", self.ctl, sys.executable, "-m", "achilles", *args, *ssh],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Python code run in the controller's namespace (a ``Pool`` there reaches the
        lab's server through the environment)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ctl, sys.executable, "-c", code],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        return self.status_at(str(self.port))

    def status_at(self, port: str) -> dict[str, Any]:
        import json

        done = self.achilles("status", "--json", timeout=60, ACHILLES_PORT=port)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    # -- what runs on the hosts ----------------------------------------------------------
    def node_pids(self) -> dict[str, int]:
        """The pid of each node ``up`` started, by host (from the hosts' pid files)."""
        pids = {}
        for name, host in self.hosts.items():
            for pidfile in host.home.glob(".local/state/achilles/nodes/*/node.pid"):
                try:
                    pids[name] = int(pidfile.read_text())
                except ValueError:
                    pass
        return pids

    def teardown(self) -> None:
        """Stop what the hosts run (by the pids their files and the launcher's state
        name, and every process whose command line points into the lab), then the lab."""
        for pid in cmdlines_with(str(self.root)):
            _kill_group(pid)
        server = self.ctl_home / ".local/state/achilles/server.pid"
        if server.exists():  # one `up --server` started
            _kill_group(int(server.read_text()))
        for fn in reversed(self._cleanup):
            try:
                fn()
            except Exception:
                pass


def cmdlines_with(text: str) -> dict[int, list[str]]:
    """Every process whose command line contains ``text``: pid -> its argv."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in raw:
                found[int(entry)] = raw.decode("utf-8", "replace").split("\0")
    return found


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
