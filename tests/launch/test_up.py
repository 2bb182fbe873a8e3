"""``achilles up`` / ``down`` / ``logs`` against real hosts: network namespaces running
OpenSSH's sshd (see :mod:`lab`), each with an empty home directory, so that the first
``up`` installs achilles there from the wheels it sends (no package index: the hosts have
no route to one)."""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest
from conftest import wait_until
from lab import Lab, cmdlines_with, unavailable

from achilles.launch.agent import alive

WHY = unavailable()
pytestmark = [
    pytest.mark.skipif(bool(WHY), reason=f"launcher tests need real SSH hosts: {WHY}"),
    pytest.mark.timeout(600),
]

MINOR = "%d.%d" % sys.version_info[:2]


def other_python() -> str:
    """A CPython of another minor version than this one, if this machine has one."""
    for path in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3.*"))):
        if re.search(r"python3\.\d+$", path) and not path.endswith(f"python{MINOR}"):
            return path
    for path in sorted(glob.glob("/usr/bin/python3.*")):
        if re.search(r"python3\.\d+$", path) and not path.endswith(f"python{MINOR}"):
            return path
    return ""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    os.chmod(root, 0o755)
    lab = Lab(root)
    try:
        for name in ("h1", "h2", "h3"):
            lab.add_host(name)
        lab.start_server()
        yield lab
    finally:
        lab.achilles("down", "--now", timeout=120)
        lab.teardown()


def lines_of(done: subprocess.CompletedProcess) -> dict[str, str]:
    """``host: text`` lines of up/down output, by host."""
    return dict(ln.split(": ", 1) for ln in done.stdout.splitlines() if re.match(r"^[\w.-]+: ", ln))


WHERE = """
import os, sys
from achilles import Pool
with Pool() as pool:
    homes = pool.map(os.path.expanduser, ["~"] * {n}, chunksize=1)
print("RESULT", sorted(set(homes)), len(homes))
"""


def test_up_three_hosts_runs_a_map_on_all_then_again_and_down(lab: Lab) -> None:
    """Three fresh hosts with 2, 1 and 1 processes: achilles installed on each from the
    shipped wheels, the server sees the three nodes (started by up), a map runs on all
    of them; a second up reuses them; down stops them; up without the install step."""
    began = time.monotonic()
    done = lab.achilles("up", "h1/2", "h2/1", "h3/1")
    with_install = time.monotonic() - began
    assert done.returncode == 0, done.stdout + done.stderr
    lines = lines_of(done)
    for host in ("h1", "h2", "h3"):
        assert lines[host].startswith("ready (") and "installed" in lines[host], lines[host]
        assert f"Python {MINOR}" in lines[host]
    assert "3 of 3 host(s) ready" in done.stdout
    nodes = {n["name"]: n for n in lab.status()["nodes"]}
    assert {k: (v["slots"], v["launcher"]) for k, v in nodes.items()} == {
        "h1": (2, "up"),
        "h2": (1, "up"),
        "h3": (1, "up"),
    }
    pids = lab.node_pids()
    assert {nodes[h]["pid"] for h in pids} == set(pids.values())
    for host in lab.hosts.values():  # each in its own private environment
        assert glob.glob(str(host.home / ".cache/achilles/*/*/bin/python"))

    run = lab.python(WHERE.format(n=60))
    assert run.returncode == 0, run.stderr
    homes = sorted(str(h.home) for h in lab.hosts.values())
    assert f"RESULT {homes} 60" in run.stdout

    hosts_file = lab.root / "hosts"
    hosts_file.write_text("# the lab\nh1 2\nh2 1   # small\n\nh3 1\n")
    again = lab.achilles("up", "--hosts-file", str(hosts_file))
    assert again.returncode == 0, again.stdout + again.stderr
    assert all("reused" in text for text in lines_of(again).values()), again.stdout
    assert lab.node_pids() == pids  # the same processes, not new ones

    down = lab.achilles("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert lines_of(down) == {"h1": "stopped", "h2": "stopped", "h3": "stopped"}
    wait_until(lambda: not lab.status()["nodes"], 20, what="nodes gone from the server")
    assert not any(alive(p) for p in pids.values())

    began = time.monotonic()
    fresh = lab.achilles("up", "h1/2", "h2/1", "h3/1")
    without_install = time.monotonic() - began
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert not any("installed" in t for t in lines_of(fresh).values()), fresh.stdout
    print(
        f"\nup on 3 hosts: {with_install:.1f} s with the install, {without_install:.1f} s without"
    )
    print(done.stdout + fresh.stdout)


def test_secret_is_in_no_command_line_and_no_readable_file(lab: Lab) -> None:
    """While up's nodes run: no process (on any host; they share this kernel) has the
    secret in its argv, and no file under the hosts' homes that holds it is readable by
    anyone but its owner."""
    done = lab.achilles("up", "h1/2", "h2/1", "h3/1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert lab.node_pids()
    assert cmdlines_with(lab.secret) == {}
    for host in lab.hosts.values():
        for path in host.home.rglob("*"):
            if (
                path.is_file()
                and not path.is_symlink()
                and lab.secret.encode() in path.read_bytes()
            ):
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert lab.secret not in (lab.ctl_home / ".local/state/achilles/up.json").read_text()


def test_down_while_a_job_runs_finishes_it_on_the_other_nodes(lab: Lab) -> None:
    done = lab.achilles("up", "h1/2", "h2/1", "h3/1")
    assert done.returncode == 0, done.stdout + done.stderr
    script = lab.root / "long_job.py"
    script.write_text(
        "import sys, tasks\nfrom achilles import Pool\n"
        "with Pool() as pool:\n"
        "    r = pool.map_async(tasks.sleep_then_square, range(120), chunksize=1)\n"
        "    print('submitted', flush=True)\n"
        "    assert r.get(240) == [x * x for x in range(120)]\n"
        "print('complete', flush=True)\n"
    )
    job = subprocess.Popen(
        ["ip", "netns", "exec", lab.ctl, sys.executable, str(script)],
        env=lab.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: any(n["inflight"] for n in lab.status()["nodes"] if n["name"] == "h3"),
            60,
            what="h3 busy with the job",
        )
        down = lab.achilles("down", "h3")
        assert down.returncode == 0, down.stdout + down.stderr
        assert lines_of(down) == {"h3": "stopped"}
        out, err = job.communicate(timeout=240)
        assert job.returncode == 0, err
        assert "complete" in out
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_logs_shows_and_follows_the_node_log(lab: Lab) -> None:
    assert lab.achilles("up", "h1/2").returncode == 0
    done = lab.achilles("logs", "h1", "-n", "20")
    assert done.returncode == 0, done.stderr
    assert "started by achilles up" in done.stdout
    assert "connected to achilles server" in done.stdout
    follow = subprocess.Popen(
        ["ip", "netns", "exec", lab.ctl, sys.executable, "-m", "achilles", "logs", "h1", "-f",
         "-F", str(lab.ssh_config)],
        env=lab.env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(follow.stdout), daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: any("connected to achilles server" in ln for ln in seen),
            30,
            what="the followed log",
        )
    finally:
        follow.terminate()
        follow.wait(timeout=10)
        reader.join(10)
        follow.stdout.close()
    # the follower on the host ends with the SSH session that ran it
    wait_until(
        lambda: not any("logs" in argv for argv in cmdlines_with("achilles.launch.agent").values()),
        20,
        what="the host's log follower to exit",
    )


def test_proxy_jump_from_the_users_ssh_config(lab: Lab) -> None:
    """A host reached through another (``ProxyJump`` in the ssh config): up works as
    ssh does; the node is told the server's address (it cannot be guessed through a
    jump host)."""
    h2 = lab.hosts["h2"]
    with open(lab.ssh_config, "a") as f:
        f.write(
            f"Host viajump\n  HostName {h2.address}\n  User root\n  ProxyJump h1\n"
            f"  IdentityFile {lab.root / 'id'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {lab.known_hosts}\n"
        )
    done = lab.achilles("up", "--advertise", f"{lab.net}.1", "viajump/1")
    assert done.returncode == 0, done.stdout + done.stderr
    node = next(n for n in lab.status()["nodes"] if n["name"] == "viajump")
    assert node["address"].startswith(h2.address + ":")
    assert lab.achilles("down", "viajump").returncode == 0


def test_each_failure_is_named(lab: Lab, tmp_path) -> None:
    """One ``up`` over hosts that each fail another way: every line says why, a node
    that dies at start shows its log, and the exit status says that some failed."""
    bins = {}
    for name, python in (("wrongpy", other_python()), ("nopy", "")):
        bins[name] = lab.root / f"bin-{name}"
        bins[name].mkdir()
        os.symlink("/bin/sh", bins[name] / "sh")
        if python:
            os.symlink(python, bins[name] / "python3")
    if not other_python():
        pytest.fail("no CPython of another minor version here for the wrong-Python host")
    lab.add_host("wrongpy", path=str(bins["wrongpy"]))
    lab.add_host("nopy", path=str(bins["nopy"]))
    lab.add_host("nokey", keys=False)
    lab.add_host("gone", sshd=False)
    lab.add_host("unknownkey", known=False)
    bad = lab.add_host("badenv")
    (bad.home / ".config/achilles").mkdir(parents=True, mode=0o700)
    (bad.home / ".config/achilles/.env").write_text("ACHILLES_MAX_ATTEMPTS=lots\n")
    lab.add_host("full", disk_mib=8)
    done = lab.achilles("up", "wrongpy", "nopy", "nokey", "gone", "unknownkey", "badenv", "full")
    print(done.stdout)
    assert done.returncode == 1
    lines = lines_of(done)
    assert lines["wrongpy"].startswith("wrong Python version: found CPython 3.")
    assert f"needs the same minor version (python{MINOR})" in lines["wrongpy"]
    assert lines["nopy"].startswith("no Python 3")
    assert lines["nokey"].startswith("authentication refused by SSH")
    assert lines["gone"].startswith("unreachable") and "refused" in lines["gone"]
    assert lines["unknownkey"].startswith("host key not trusted")
    assert lines["badenv"].startswith("node exited: exit status 2")
    assert "ACHILLES_MAX_ATTEMPTS in .env must be a number" in done.stdout
    assert lines["full"].startswith("no disk space: ")
    assert "0 of 7 host(s) ready" in done.stdout

    trusted = lab.achilles("up", "--accept-new-host-keys", "unknownkey/1")
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert lab.achilles("down", "unknownkey").returncode == 0


#: nftables (in /usr/sbin, which a minimal PATH leaves out)
NFT = shutil.which("nft") or next(
    (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
)


def nft(ns: str, *rules: str) -> None:
    for rule in rules:
        subprocess.run(["ip", "netns", "exec", ns, str(NFT), *rule.split()], check=True)


@pytest.mark.skipif(NFT is None, reason="needs nftables (nft) to block the port")
def test_tunnel_reaches_a_server_whose_port_is_blocked(lab: Lab) -> None:
    """With the server's port dropped between the hosts and the server (only SSH gets
    through), a plain up fails with a hint, and ``up --tunnel`` works."""
    lab.add_host("far")
    nft(
        lab.ctl,
        "add table inet achtest",
        "add chain inet achtest input { type filter hook input priority 0 ; }",
        f"add rule inet achtest input iifname {lab.bridge} tcp dport {lab.port} drop",
    )
    try:
        blocked = lab.achilles("up", "--timeout", "8", "far/1")
        assert blocked.returncode == 1
        assert "not connected within 8 s" in blocked.stdout and "--tunnel" in blocked.stdout
        done = lab.achilles("up", "--tunnel", "far/1")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "via SSH tunnel" in lines_of(done)["far"]
        run = lab.python(
            "from achilles import Pool\nimport os\n"
            "with Pool() as p:\n"
            "    print('RESULT', sorted(set(p.map(os.path.expanduser, ['~'] * 40, chunksize=1))))"
        )
        assert run.returncode == 0, run.stderr
        assert str(lab.hosts["far"].home) in run.stdout
        down = lab.achilles("down", "far")
        assert down.returncode == 0, down.stdout
        assert not cmdlines_with(f"{lab.ssh_config}") or all(
            "-R" not in argv for argv in cmdlines_with(str(lab.ssh_config)).values()
        )
    finally:
        subprocess.run(
            ["ip", "netns", "exec", lab.ctl, str(NFT), "delete", "table", "inet", "achtest"]
        )


def test_up_server_starts_a_server_here_and_down_server_stops_it(lab: Lab) -> None:
    """``up --server`` with no server on the configured port starts one on this
    machine (detached), points the node at it; ``down --server`` stops both."""
    port = str(random.randrange(20000, 60000))
    done = lab.achilles("up", "--server", "h2/1", ACHILLES_PORT=port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"started a server on 0.0.0.0:{port}" in done.stdout
    assert lines_of(done)["h2"].startswith("ready (1 processes")
    names = [n["name"] for n in lab.status_at(port)["nodes"]]
    assert names == ["h2"]
    down = lab.achilles("down", "--server", "h2", ACHILLES_PORT=port)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "server: stopped" in down.stdout
    assert not cmdlines_with(f"--port\0{port}")
