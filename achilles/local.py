"""The embedded local cluster: what ``Pool()`` runs when no cluster is configured.

One child process runs a server on 127.0.0.1 (port 0, a random secret) and a node with
``processes`` workers, in one reactor. We read the bound port from its first line of
stdout, and stop it by PID (SIGTERM, then SIGKILL). It runs in its own session, so a
Ctrl-C meant for the caller does not kill it mid-job, and it exits by itself when its
stdin closes, so a caller that dies never leaves it behind.
"""
from __future__ import annotations

import atexit
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import weakref

from achilles.config import Settings
from achilles.errors import AchillesError

START_TIMEOUT = 30.0
_LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
_live: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()


class LocalCluster:
    def __init__(self, processes: int, max_attempts: int = 3) -> None:
        self.secret = secrets.token_hex(16)
        env = dict(os.environ, ACHILLES_SECRET_KEY=self.secret, PYTHONUNBUFFERED="1")
        for key in ("ACHILLES_HOST", "ACHILLES_PORT"):
            env.pop(key, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "achilles", "local", "--processes", str(processes),
             "--log-level", os.environ.get("ACHILLES_LOG_LEVEL", "WARNING")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            start_new_session=True)
        self.pid = self.proc.pid
        _live.add(self)
        self.port = self._read_port()
        self.settings = Settings(host="127.0.0.1", port=self.port, secret_key=self.secret,
                                 processes=processes, max_attempts=max_attempts)

    def _read_port(self) -> int:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(
            self.proc.stdout.readline().decode()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(START_TIMEOUT)
        match = _LISTENING.search(box[0]) if box else None
        if match is None:
            self.stop()
            raise AchillesError(
                f"the embedded achilles cluster did not start within {START_TIMEOUT:g} s "
                f"(exit code {self.proc.poll()}); run `python -m achilles local` to see why")
        return int(match.group(2))

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait, then SIGKILL the whole session, by PID."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)  # it tears its pool down itself
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the forkserver and workers too
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        _live.discard(self)


@atexit.register
def _stop_all() -> None:
    for cluster in list(_live):
        cluster.stop(timeout=2.0)
