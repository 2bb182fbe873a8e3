"""Unit files that run a node or the server as a systemd service.

``Restart=on-failure`` brings a crashed node back; ``achilles kill`` makes a node exit
with status 0, and a configuration it cannot run with (no secret, bad settings, a
refusal the server proved) exits with 2, neither of which is restarted
(``RestartPreventExitStatus=2``). (A wrong secret is not final: the server's refusal
cannot be told from an impostor's, so the node keeps retrying with backoff.) The secret is read from
an environment file that only its owner can read, never from the command line.
"""

from __future__ import annotations

import getpass
import os
import shlex
import sys
from collections.abc import Sequence


def unit(role: str, args: Sequence[str], env_file: str | None = None) -> str:
    """A unit for ``achilles <role> <args>`` run by this Python, as this user."""
    env_file = env_file or (
        f"/etc/achilles/{role}.env" if os.geteuid() == 0 else f"%h/.config/achilles/{role}.env"
    )
    argv = [sys.executable, "-m", "achilles", role, *args]
    if role == "node":
        argv += ["--launched-by", "systemd"]
    what = "all cores of this machine for the cluster" if role == "node" else "the cluster's server"
    user = getpass.getuser()
    return f"""\
# achilles {role}: {what}.
# Install: save as /etc/systemd/system/achilles-{role}.service, then
#   install -d -m 700 {os.path.dirname(env_file)}
#   install -m 600 /dev/null {env_file}     # then write ACHILLES_SECRET_KEY=... into it
#   systemctl daemon-reload && systemctl enable --now achilles-{role}
# Exit status 0 (after `achilles kill`) and 2 (a configuration it cannot run with) are
# not restarted; a crash is, after 5 s.
[Unit]
Description=achilles {role} ({what})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
EnvironmentFile={env_file}
ExecStart={shlex.join(argv)}
Restart=on-failure
RestartSec=5
RestartPreventExitStatus=2
# a node drains on SIGTERM: it finishes the chunks in hand (at most 30 s)
KillSignal=SIGTERM
TimeoutStopSec=45
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""
