"""The launcher's pieces without hosts: host specs, ssh's errors and command lines, the
wheel set, the systemd units, and the host agent's pid check."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from achilles.errors import ConfigError
from achilles.launch import agent, hosts, ssh, systemd, wheels
from achilles.launch.hosts import Host


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("node1", Host("node1")),
        ("alice@node1", Host("node1", "alice")),
        ("alice@node1:2222", Host("node1", "alice", 2222)),
        ("node1/4", Host("node1", None, None, 4)),
        ("bob@10.0.0.7:22/8", Host("10.0.0.7", "bob", 22, 8)),
        ("node1 4", Host("node1", None, None, 4)),
        ("node1:2200 16", Host("node1", None, 2200, 16)),
        ("[fe80::1]:22/2", Host("fe80::1", None, 22, 2)),
    ],
)
def test_host_specs(spec: str, expected: Host) -> None:
    assert hosts.parse(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "-oProxyCommand=evil", "node1:0", "node1:70000", "node1/0", "a b c", "x@@y"]
)
def test_bad_host_specs_are_refused_with_the_format(spec: str) -> None:
    """Nothing that ssh would read as an option, no port 0, no zero processes."""
    with pytest.raises(ConfigError, match=r"\[user@\]host|port|processes"):
        hosts.parse(spec)


def test_hosts_file_with_comments_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# lab\nnode1 4   # the big one\n\nalice@node2:2222\n")
    assert hosts.read_file(str(path)) == [Host("node1", processes=4), Host("node2", "alice", 2222)]
    path.write_text("node1\nnode 2 3\n")
    with pytest.raises(ConfigError, match=r"hosts:2: "):
        hosts.read_file(str(path))
    with pytest.raises(ConfigError, match="named twice"):
        hosts.unique([Host("a"), Host("a", "bob")])


@pytest.mark.parametrize(
    "stderr,reason",
    [
        ("root@10.1.1.1: Permission denied (publickey).", "authentication refused by SSH"),
        ("ssh: connect to host 10.1.1.1 port 22: Connection refused", "unreachable"),
        ("ssh: connect to host 10.1.1.1 port 22: No route to host", "unreachable"),
        ("ssh: Could not resolve hostname nohost: Name or service not known", "unreachable"),
        ("Host key verification failed.", "host key not trusted"),
        ("something new", "ssh failed"),
    ],
)
def test_ssh_errors_are_named(stderr: str, reason: str) -> None:
    err = ssh.classify(stderr)
    assert err.reason.startswith(reason)
    assert err.detail == stderr.strip()


def test_ssh_command_is_never_interactive_and_honours_the_user_config() -> None:
    """BatchMode (a prompt would hang), no host-key override unless asked, the user's
    options passed on, and remote arguments quoted for the remote shell."""
    s = ssh.Ssh(Host("h", "u", 2222), ("-F", "/cfg"))
    try:
        argv = s.argv(["echo", "it's", "$HOME"])
        assert argv[0] == "ssh" and "BatchMode=yes" in argv
        assert not any("StrictHostKeyChecking" in a for a in argv)
        assert argv[-2:] == ["u@h", "echo 'it'\"'\"'s' '$HOME'"]
        assert argv[argv.index("-p") + 1] == "2222" and "/cfg" in argv
    finally:
        s.close()
    trusting = ssh.Ssh(Host("h"), accept_new_host_keys=True)
    try:
        assert "StrictHostKeyChecking=accept-new" in trusting.argv("true")
    finally:
        trusting.close()


def test_requirement_lines() -> None:
    assert wheels._parse("twisted[tls]>=22.10", set()) == ("twisted", frozenset({"tls"}))
    assert wheels._parse("idna; extra == 'idna'", set()) is None
    assert wheels._parse("idna; extra == 'idna'", {"idna"}) == ("idna", frozenset())
    assert wheels._parse('pywin32; platform_system == "Windows"', set()) == (
        "pywin32",
        frozenset(),
    )


def test_wheel_tags() -> None:
    text = (
        "Wheel-Version: 1.0\nTag: cp311-cp311-manylinux_2_17_x86_64\n"
        "Tag: cp311-cp311-manylinux2014_x86_64\n"
    )
    assert wheels._tags(text) == "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64"
    assert wheels._tags("") == "py3-none-any"


def test_wheel_set_installs_offline(tmp_path: Path) -> None:
    """The wheels built from this environment install into a new one with no index, and
    give the same achilles (the launcher's tests do this on real hosts too)."""
    house = wheels.build(tmp_path / "wh")
    names = {n.split("-")[0].lower() for n in house.files}
    assert {"achilles", "twisted", "dill", "multiprocess", "pip"} <= names
    with zipfile.ZipFile(
        house.path / next(f for f in house.files if f.startswith("achilles"))
    ) as z:
        assert "achilles/launch/agent.py" in z.namelist()
        record = z.read(next(n for n in z.namelist() if n.endswith("/RECORD"))).decode()
        assert "achilles/__init__.py,sha256=" in record
    assert wheels.build(tmp_path / "wh").digest == house.digest  # same code, same set
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    pip = house.path / next(f for f in house.files if f.startswith("pip-")) / "pip"
    subprocess.run(
        [env / "bin/python", pip, "install", "--no-index", "--find-links", house.path,
         "--quiet", "--disable-pip-version-check", "achilles[tls]"],
        check=True, timeout=300,
    )  # fmt: skip
    done = subprocess.run(
        [env / "bin/python", "-c", "import achilles, OpenSSL; print(achilles.__version__)"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    import achilles

    assert done.stdout.strip() == achilles.__version__


def test_systemd_units_restart_on_failure_and_hold_no_secret() -> None:
    text = systemd.unit("node", ["--host", "10.0.0.1", "--processes", "4"])
    assert "Restart=on-failure" in text and "RestartPreventExitStatus=2" in text
    assert "EnvironmentFile=" in text and "SECRET_KEY=" not in text.split("[Unit]")[1]
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert exec_start.endswith("node --host 10.0.0.1 --processes 4 --launched-by systemd")
    server = systemd.unit("server", ["--port", "9999"])
    assert "--launched-by" not in server and "achilles server --port 9999" in server


def test_print_unit_refuses_a_secret_on_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "achilles", "node", "--secret-key", "s3cret",
         "--print-systemd-unit"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "never carries the secret" in done.stderr and "s3cret" not in done.stdout


def test_agent_trusts_a_pid_file_only_for_its_own_node(tmp_path: Path, monkeypatch) -> None:
    """A stale pid file naming some other process (pid reused) is not a running node."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    home = agent.node_dir("h1")
    home.mkdir(parents=True)
    (home / "node.pid").write_text(f"{os.getpid()}\n")  # this pytest: not a node named h1
    assert agent.running("h1") == 0
    with pytest.raises(SystemExit):
        agent.node_dir("../escape")
