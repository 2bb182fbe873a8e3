"""achilles.testing: a throwaway cluster on loopback ignores the caller's configuration
(its ACHILLES_* variables and its user-level .env) and leaves no process behind."""

from __future__ import annotations

import os
import socket

import pytest
from conftest import child_env, run_python

from achilles import Pool, testing
from achilles.config import cluster_configured


@pytest.fixture
def decoy():
    """A listening socket on loopback that nothing of the cluster may connect to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


def plant_user_config(home, decoy_port: int) -> None:
    """A user .env that points at the decoy, and would break a server that read it."""
    (home / "achilles").mkdir(parents=True)
    (home / "achilles").chmod(0o700)  # trusted: achilles ignores a .env others could write
    env_file = home / "achilles" / ".env"
    env_file.write_text(
        f"ACHILLES_HOST=127.0.0.1\nACHILLES_PORT={decoy_port}\nACHILLES_SECRET_KEY=decoy\n"
        f"ACHILLES_TLS_CERT={home}/missing-cert.pem\nACHILLES_TLS_KEY={home}/missing-key.pem\n"
    )
    env_file.chmod(0o600)


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with, from /proc."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [kv.decode(errors="replace") for kv in f.read().split(b"\0") if kv]
    return dict(kv.split("=", 1) for kv in items if "=" in kv)


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process under it, from /proc."""
    parent = {p: pp for p, (pp, _, state) in testing.proc_table().items() if state != "Z"}
    found = {pid}
    grew = True
    while grew:
        more = {p for p, pp in parent.items() if pp in found} - found
        found |= more
        grew = bool(more)
    return found


def running(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cluster_ignores_planted_config_and_leaves_nothing(tmp_path, monkeypatch, decoy):
    """With a user .env and ACHILLES_* variables pointing elsewhere, start_cluster's
    processes see neither (only what was passed explicitly), a Pool.map on it works,
    nothing connects to the decoy, and every process is gone after stop()."""
    home = tmp_path / "config"
    plant_user_config(home, decoy.getsockname()[1])
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.setenv("ACHILLES_MAX_CONNECTIONS", "1")  # would starve a server that read it
    monkeypatch.chdir(tmp_path)
    assert cluster_configured()  # the caller itself does see the planted configuration

    cluster = testing.start_cluster(nodes=2, env={"ACHILLES_MAX_ATTEMPTS": "5"})
    try:
        assert cluster.server is not None
        for proc in cluster.processes():
            env = environ_of(proc.pid)
            assert env["XDG_CONFIG_HOME"] != str(home)
            # (and the server's dashboard off: test servers do not compete for its port)
            dashboard = ["ACHILLES_DASHBOARD"] if proc is cluster.server else []
            assert sorted(k for k in env if k.startswith("ACHILLES_")) == [
                *dashboard,
                "ACHILLES_LOG_LEVEL",
                "ACHILLES_MAX_ATTEMPTS",
                "ACHILLES_SECRET_KEY",
            ]
        with Pool(**cluster.kwargs()) as pool:
            assert pool._local is None
            assert pool.map(abs, range(-40, 0), chunksize=3) == list(range(40, 0, -1))
        assert cluster.node_count() == 2
        started = set().union(*(descendants(p.pid) for p in cluster.processes()))
        assert len(started) > 3  # server, nodes and the nodes' workers
    finally:
        cluster.stop()

    with pytest.raises(BlockingIOError):
        decoy.accept()
    testing.wait_until(
        lambda: not any(running(pid) for pid in started),
        10,
        what="every process of the cluster to be gone",
    )
    assert not any(testing.group_members(p.pid) for p in cluster.processes())
    assert not set(testing.leftover_processes(timeout=0)) & set(cluster.processes())
    assert not os.path.exists(cluster.workdir)


def test_harness_is_imported_only_when_asked(tmp_path):
    """``import achilles`` does not load achilles.testing, which loads neither pytest
    nor twisted."""
    out = run_python(
        "import sys, achilles\n"
        "assert 'achilles.testing' not in sys.modules\n"
        "import achilles.testing\n"
        "assert not {'pytest', 'twisted'} & set(sys.modules), sorted(sys.modules)\n",
        cwd=tmp_path,
        env=child_env(),
    )
    assert out.returncode == 0, out.stderr
