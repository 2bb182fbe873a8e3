"""A node run as its systemd unit says: the unit's ``ExecStart`` with the environment
of its ``EnvironmentFile`` (as systemd would; no systemd is needed), then ``achilles
kill``: the node exits with a status the unit does not restart on. A configuration it
cannot run with ends with status 2, which the unit does not restart on either."""

from __future__ import annotations

import secrets
import shlex
import subprocess
import sys

from conftest import Proc, child_env, wait_until


def _unit(*args: str) -> dict[str, str]:
    text = subprocess.run(
        [sys.executable, "-m", "achilles", *args, "--print-systemd-unit"],
        capture_output=True, text=True, check=True, env=child_env(),
    ).stdout  # fmt: skip
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln and ln[0] != "#")


def _environment_file(path, **values: str) -> dict[str, str]:
    """Write it 0600, as the unit's comments say; read it back as systemd would."""
    path.touch(mode=0o600)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    assert path.stat().st_mode & 0o077 == 0
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines())


def test_unit_node_stops_for_good_on_kill_and_on_a_bad_configuration(request, tmp_path) -> None:
    secret = secrets.token_urlsafe(24)
    server = Proc(
        [sys.executable, "-m", "achilles", "server", "--port", "0"],
        env=child_env(ACHILLES_SECRET_KEY=secret),
        name="server",
    )
    request.addfinalizer(server.stop)
    out = wait_until(lambda: "listening on" in server.output() and server.output(), 20)
    port = out.split("listening on 127.0.0.1:")[1].split()[0]

    unit = _unit("node", "--port", port, "--processes", "1", "--name", "svc1")
    assert unit["Restart"] == "on-failure" and unit["RestartPreventExitStatus"] == "2"
    env = _environment_file(tmp_path / "node.env", ACHILLES_SECRET_KEY=secret)
    node = Proc(shlex.split(unit["ExecStart"]), env=child_env(**env), name="unit-node")
    request.addfinalizer(node.stop)
    wait_until(
        lambda: "svc1" in subprocess.run(
            [sys.executable, "-m", "achilles", "status", "--port", port],
            env=child_env(ACHILLES_SECRET_KEY=secret), capture_output=True, text=True,
        ).stdout,
        20,
        what="the unit's node connected",
    )  # fmt: skip
    status = subprocess.run(
        [sys.executable, "-m", "achilles", "status", "--port", port],
        env=child_env(ACHILLES_SECRET_KEY=secret), capture_output=True, text=True,
    )  # fmt: skip
    assert "systemd" in status.stdout  # shown as started by systemd
    kill = subprocess.run(
        [sys.executable, "-m", "achilles", "kill", "--yes", "--port", port],
        env=child_env(ACHILLES_SECRET_KEY=secret), capture_output=True, text=True,
    )  # fmt: skip
    assert kill.returncode == 0, kill.stderr
    assert node.popen.wait(timeout=30) == 0  # on-failure does not restart 0

    empty = _environment_file(tmp_path / "empty.env", ACHILLES_PROCESSES="0")
    refused = Proc(shlex.split(unit["ExecStart"]), env=child_env(**empty), name="refused")
    request.addfinalizer(refused.stop)
    assert refused.popen.wait(timeout=30) == 2  # RestartPreventExitStatus=2
    assert "secret" in refused.output()
