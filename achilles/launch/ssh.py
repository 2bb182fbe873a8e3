"""SSH as the user has it set up: the system's OpenSSH client, so that ``~/.ssh/config``
(``Host`` aliases, ``ProxyJump``, ``IdentityFile``, ``Match``), the agent, hardware keys
and ``known_hosts`` work exactly as they do for ``ssh`` in a terminal.

Never interactive (``BatchMode``: a password prompt would hang a launch): keys or an
agent are needed. An unknown host key is refused unless the user opts in
(``StrictHostKeyChecking=accept-new``). The several commands run on one host share one
connection (``ControlMaster``, closed by :meth:`Ssh.close`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from achilles.launch.hosts import Host

#: ssh exits with 255 for its own errors (the remote command's status otherwise)
SSH_ERROR = 255

_REASONS = (
    (
        re.compile(r"Permission denied|Too many authentication failures"),
        "authentication refused by SSH",
    ),
    (
        re.compile(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "host key not trusted (unknown or changed; see known_hosts, or pass "
        "--accept-new-host-keys to trust a new host)",
    ),
    (
        re.compile(
            r"Connection refused|No route to host|Connection timed out|timed out|"
            r"Could not resolve hostname|Network is unreachable|Name or service not known|"
            r"Connection closed by|Connection reset"
        ),
        "unreachable",
    ),
)


class SshError(Exception):
    """ssh itself failed: ``reason`` in a few words, ``detail`` its own last line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def classify(stderr: str) -> SshError:
    """ssh's error output as a reason a user can act on (ssh has no other way to say)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Warning: Permanently added", "**"))]
    detail = lines[-1][:300] if lines else "ssh failed with no message"
    for pattern, reason in _REASONS:
        if pattern.search(stderr):
            return SshError(reason, detail)
    return SshError("ssh failed", detail)


@dataclass
class Ssh:
    """Runs commands on one host."""

    host: Host
    #: extra ``-o`` options and other ssh arguments (``--ssh-option``)
    options: Sequence[str] = ()
    accept_new_host_keys: bool = False
    connect_timeout: float = 10.0
    _control: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if shutil.which("ssh") is None:
            raise SshError("no ssh client", "install OpenSSH's ssh (Debian: openssh-client)")
        # a private directory for the shared connection's socket
        self._control = tempfile.mkdtemp(prefix="achilles-ssh-")

    def argv(self, remote: Sequence[str] | str, *, share: bool = True) -> list[str]:
        """The ``ssh`` command running ``remote`` (a list is quoted for the remote shell)."""
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(self.connect_timeout)}"]
        cmd += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.accept_new_host_keys:
            cmd += ["-o", "StrictHostKeyChecking=accept-new"]
        if share:
            cmd += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}/%C"]
            cmd += ["-o", "ControlPersist=120"]
        else:
            cmd += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        if self.host.port:
            cmd += ["-p", str(self.host.port)]
        cmd += [*self.options, self.host.target]
        if isinstance(remote, str):
            return [*cmd, remote] if remote else cmd
        return [*cmd, " ".join(_quote(a) for a in remote)]

    def run(
        self, remote: Sequence[str] | str, stdin: bytes = b"", timeout: float = 120.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``remote``; its completed process (any exit status but ssh's own 255).

        Raises:
            SshError: ssh could not connect, authenticate or run it.
        """
        try:
            done = subprocess.run(
                self.argv(remote), input=stdin, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise SshError(
                "timed out", f"no answer from {self.host.target} in {timeout:.0f} s"
            ) from None
        if done.returncode == SSH_ERROR:
            raise classify(done.stderr.decode("utf-8", "replace"))
        return done

    def popen(self, remote: Sequence[str] | str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(remote), **kwargs)  # type: ignore[call-overload]

    def close(self) -> None:
        """Close the shared connection (if one was made) and its directory."""
        subprocess.run(
            [
                "ssh",
                "-o",
                f"ControlPath={self._control}/%C",
                "-O",
                "exit",
                *self._port(),
                *self.options,
                self.host.target,
            ],
            capture_output=True,
            timeout=10,
        )
        shutil.rmtree(self._control, ignore_errors=True)

    def _port(self) -> list[str]:
        return ["-p", str(self.host.port)] if self.host.port else []


def _quote(arg: str) -> str:
    """One argument for the remote POSIX shell."""
    if re.fullmatch(r"[A-Za-z0-9_./:=@%+-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"
