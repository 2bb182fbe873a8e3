"""Messages a newcomer meets, each tried as a new user would: a server that is not
there, a node that cannot reach it, a job with no node, a port in use, `achilles kill`
without a terminal, and the `--help`, `--version` and `status` texts."""

from __future__ import annotations

import os
import pty
import re
import socket
import subprocess
import sys
import time

from conftest import child_env, wait_until

from achilles import Pool
from achilles.errors import ConnectionLostError

SECRET = "a-test-secret-that-is-long-enough-0123456789"


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _achilles(*args: str, timeout: float = 30, script: str = "", **env: str):
    cmd = [script] if script else [sys.executable, "-m", "achilles"]
    if script:
        cmd = [os.path.join(os.path.dirname(sys.executable), script)]
    return subprocess.run(
        [*cmd, *args],
        env=child_env(ACHILLES_SECRET_KEY=SECRET, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_status_and_kill_say_at_once_that_the_server_is_not_there(tmp_path):
    """`achilles status` and `achilles kill --yes` against a closed port fail within
    seconds, naming the address and the reason, with no traceback."""
    port = _closed_port()
    for command in (["status"], ["kill", "--yes"]):
        start = time.monotonic()
        out = _achilles(*command, "--port", str(port))
        took = time.monotonic() - start
        assert out.returncode == 2, out
        assert f"cannot connect to 127.0.0.1:{port}: connection refused" in out.stderr
        assert "Traceback" not in out.stderr and took < 10, (took, out.stderr)


def test_pool_says_at_once_that_the_server_is_not_there(monkeypatch):
    """Pool(host=..., port=closed) raises within seconds, naming address and reason
    (it used to wait 60 s for "no answer")."""
    port = _closed_port()
    start = time.monotonic()
    try:
        Pool(host="127.0.0.1", port=port, secret_key=SECRET)
    except ConnectionLostError as exc:
        assert str(exc) == f"cannot connect to 127.0.0.1:{port}: connection refused"
    else:
        raise AssertionError("Pool connected to a closed port")
    assert time.monotonic() - start < 10


def test_node_logs_each_failed_attempt_and_the_next_delay(tmp_path):
    """A node whose server is not up logs every failed attempt with the reason and the
    delay before the next one, and keeps trying."""
    from achilles.testing import Proc

    port = _closed_port()
    node = Proc(
        [sys.executable, "-m", "achilles", "node", "--port", str(port), "--processes", "1"],
        env=child_env(ACHILLES_SECRET_KEY=SECRET, PYTHONUNBUFFERED="1"),
        cwd=str(tmp_path),
        name="node",
    )
    try:
        pattern = re.compile(
            rf"cannot connect to the server at 127\.0\.0\.1:{port}: connection refused; "
            r"next attempt in \d+\.\d s"
        )
        wait_until(lambda: len(pattern.findall(node.output())) >= 2, 30, alive=node.alive)
    finally:
        node.stop()


def test_job_with_no_node_warns_in_the_caller(fresh_cluster, tmp_path):
    """A job submitted to a cluster with no node: the caller is told within a few
    seconds that it waits for one; the same after killCluster() with a job pending."""
    cluster = fresh_cluster(nodes=1)
    code = (
        "import sys, time\nimport achilles\nfrom achilles import Pool\n"
        f"kw = dict(host='127.0.0.1', port={cluster.port}, secret_key='{cluster.secret}')\n"
        "with Pool(**kw) as pool:\n"
        "    assert pool.map(abs, [-1]) == [1]\n"
        "    achilles.killCluster(command_verified=True, **kw)\n"
        "    r = pool.map_async(abs, [-2])\n"
        "    pool.close()\n"
        "    t = time.monotonic()\n"
        "    pool._jobs and r.wait(8)\n"
        "    sys.stderr.write(f'WAITED {time.monotonic() - t:.1f}\\n')\n"
        "    pool.terminate()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"no node connected to the cluster at 127.0.0.1:{cluster.port}; waiting" in out.stderr, (
        out.stderr
    )


def test_port_in_use_and_foreign_bind_address_are_one_line(tmp_path):
    """A server on a port in use, or on an address not of this machine: one line on
    stderr, exit code 2, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _achilles("server", "--port", str(port))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"achilles server: error: cannot listen on 127.0.0.1:{port}: the port is in use "
        "(another server running? choose another with --port)"
    ]
    out = _achilles("server", "--host", "192.0.2.1", "--port", "0")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "192.0.2.1 is not an address of this machine" in out.stderr


def test_kill_without_a_terminal_says_use_yes():
    """`achilles kill` with no terminal to confirm on: "use --yes", exit 2, nothing
    stopped, no traceback."""
    out = _achilles("kill", "--port", str(_closed_port()))
    assert out.returncode == 2
    assert out.stderr.strip().endswith("there is no terminal to ask on: use --yes")
    assert "Traceback" not in out.stderr and "command_verified" not in out.stderr


def test_cancelled_kill_exits_nonzero_and_tells_no_node(cluster):
    """Answering "n" at the prompt: exit status 1, "cancelled", no "told 0 node(s)", and
    the nodes keep running."""
    pid, fd = pty.fork()
    if pid == 0:
        env = child_env(ACHILLES_SECRET_KEY=cluster.secret)
        os.execve(
            sys.executable,
            [sys.executable, "-m", "achilles", "kill", "--port", str(cluster.port)],
            env,
        )
    seen = b""
    try:
        while b"[y/N]" not in seen:
            data = os.read(fd, 4096)
            if not data:
                break
            seen += data
        os.write(fd, b"n\n")
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            seen += data
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode()
    assert f"stop every node of the cluster at 127.0.0.1:{cluster.port}? [y/N]" in text
    assert os.waitstatus_to_exitcode(status) == 1, text
    assert "cancelled; no node was told to stop" in text and "told 0" not in text
    assert cluster.node_count() == 2


def test_help_texts():
    """`achilles-server --help` names itself, offers no client-only option, says that
    --host is the bind address; every option with a setting names its variable;
    --log-level shows its default and refuses unknown levels; --version everywhere."""
    server = _achilles("--help", script="achilles-server")
    assert server.returncode == 0
    assert server.stdout.startswith("usage: achilles-server ")
    assert "--tls-ca" not in server.stdout and "--username" not in server.stdout
    assert "address to listen on (bind address" in server.stdout
    node = _achilles("--help", script="achilles-node").stdout
    assert node.startswith("usage: achilles-node ")
    for text in (server.stdout, node, _achilles("status", "--help").stdout):
        flat = " ".join(text.split())
        assert "(ACHILLES_LOG_LEVEL; default INFO)" in flat
        for option in ("--host", "--port", "--tls ", "--secret-key", "--processes", "--name"):
            if option in flat:
                env = "ACHILLES_" + option.strip().lstrip("-").replace("-", "_").upper()
                assert env in flat, (option, flat)
    bad = _achilles("status", "--log-level", "LOUD")
    assert bad.returncode == 2 and "invalid choice: 'LOUD'" in bad.stderr
    env_bad = _achilles("status", "--port", "1", ACHILLES_LOG_LEVEL="LOUD")
    assert env_bad.returncode == 2
    for args, script in (
        (["--version"], ""),
        (["status", "--version"], ""),
        (["--version"], "achilles-server"),
        (["--version"], "achilles-node"),
    ):
        out = _achilles(*args, script=script)
        assert out.returncode == 0 and re.search(r"\d+\.\d+\.\d+", out.stdout), (args, out)


def test_controller_mid_job_says_it_is_retrying(fresh_cluster, tmp_path):
    """A program whose server goes away mid-job says so (address and reason) while it
    keeps retrying, and its job completes once the server is back."""
    cluster = fresh_cluster(nodes=1)
    port = cluster.port
    code = (
        "import sys, time\nfrom achilles import Pool\n"
        "def nap(x):\n    time.sleep(0.2)\n    return x\n"
        f"with Pool(host='127.0.0.1', port={port}, secret_key='{cluster.secret}') as pool:\n"
        "    r = pool.map_async(nap, range(20), chunksize=1)\n"
        "    print('STARTED', flush=True)\n"
        "    print('RESULT', sum(r.get(120)), flush=True)\n"
    )
    from achilles.testing import Proc

    prog = Proc(
        [sys.executable, "-c", code],
        env=child_env(PYTHONUNBUFFERED="1"),
        cwd=str(tmp_path),
        name="controller",
    )
    try:
        wait_until(lambda: "STARTED" in prog.output(), 30, alive=prog.alive)
        cluster.server.stop()
        wait_until(
            lambda: (
                f"cannot connect to the achilles server at 127.0.0.1:{port}: "
                "connection refused; retrying" in prog.output()
            ),
            30,
            alive=prog.alive,
        )
        cluster.start_server(port=port)
        wait_until(lambda: "RESULT 190" in prog.output(), 90, alive=prog.alive)
    finally:
        prog.stop()


def test_server_logs_a_refused_node_with_its_address(fresh_cluster, tmp_path):
    """A node with the wrong secret: the server's log names the address it came from
    and why it was refused."""
    from achilles.testing import Proc

    cluster = fresh_cluster(nodes=0)
    proc = Proc(
        [sys.executable, "-m", "achilles", "node", "--port", str(cluster.port)],
        env=child_env(ACHILLES_SECRET_KEY="not-the-cluster-secret"),
        cwd=str(tmp_path),
        name="badnode",
    )
    try:
        wait_until(
            lambda: re.search(
                r"login from 127\.0\.0\.1 failed: .*wrong secret", cluster.server.output()
            ),
            30,
            alive=proc.alive,
        )
    finally:
        proc.stop()
