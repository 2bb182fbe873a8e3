"""Pool() with nothing configured runs on an embedded local cluster, and cleans it up."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import run_python, wait_until

from achilles import Pool


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped between the two looks
        return True


def _workers(pool) -> list[int]:
    """The embedded node's worker processes (the fork server outlives a pool, as
    multiprocessing's does, and serves the next one)."""
    return pool._local.worker_pids()


def test_embedded_cluster_runs_and_stops(no_cluster_config):
    """Pool(2) starts a local server+node with two workers, maps correctly, and stops
    them on terminate."""
    with Pool(2) as pool:
        workers = _workers(pool)
        assert len(workers) == 2 and os.getpid() not in workers
        assert pool._processes == 2
        assert pool.map(abs, range(-5, 5)) == [abs(x) for x in range(-5, 5)]
        assert list(pool.imap(str, range(3))) == ["0", "1", "2"]
    wait_until(lambda: all(_gone(p) for p in workers), 10, what="the workers to exit")


def test_close_join_stops_embedded_cluster(no_cluster_config):
    """close() then join() waits for the work, then stops the local cluster."""
    pool = Pool(1)
    workers = _workers(pool)
    r = pool.map_async(abs, [-1, -2])
    pool.close()
    pool.join()
    assert r.get(1) == [1, 2]
    wait_until(lambda: all(_gone(p) for p in workers), 10, what="the workers to exit")


SCRIPT = """
from achilles import Pool          # the only line changed from a multiprocessing script

def f(x):
    return x * x

if __name__ == "__main__":
    with Pool(2) as p:
        print(p.map(f, range(10)))
        print(sum(p.imap_unordered(f, range(100))))
"""


def test_unchanged_script_runs(tmp_path):
    """A multiprocessing-style script runs unchanged with `from achilles import Pool`."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str([x * x for x in range(10)]), "328350"]


def test_exit_while_map_pending_does_not_hang(tmp_path):
    """A process that exits while a map_async is still running exits promptly, and its
    embedded cluster's processes (fork server and workers) go with it."""
    code = (
        "import achilles, time\n"
        "p = achilles.Pool(1)\n"
        "print(*p._local.pids(), flush=True)\n"
        "r = p.map_async(time.sleep, [30])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(code, cwd=tmp_path, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    wait_until(lambda: all(_gone(p) for p in pids), 10, what="the cluster's processes")


def test_killed_caller_leaves_nothing_behind(tmp_path):
    """SIGKILL of a process whose embedded cluster is running a task leaves no process
    of that cluster behind."""
    code = (
        "import achilles, os, signal, time\n"
        "p = achilles.Pool(1)\n"
        "print(*p._local.pids(), flush=True)\n"
        "r = p.map_async(time.sleep, [30])\n"
        "time.sleep(0.5)\n"  # sync-ok: lets the task start; any moment would do
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(code, cwd=tmp_path, env=env, timeout=30)
    assert out.returncode == -9, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    wait_until(lambda: all(_gone(p) for p in pids), 10, what="the cluster's processes")


def test_script_without_main_guard(tmp_path):
    """A script with no ``if __name__ == "__main__"`` guard works: the workers do not run
    the caller's script again."""
    script = tmp_path / "noguard.py"
    script.write_text(
        "from achilles import Pool\n"
        "def f(x):\n"
        "    return x + 1\n"
        "with Pool(1) as p:\n"
        "    print(p.map(f, range(5)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1, 2, 3, 4, 5]"
    assert "bootstrapping" not in out.stderr


def test_repeated_use_in_one_process(tmp_path):
    """Many pools, one after another, in one process (as in a notebook) all work."""
    code = (
        "import achilles\n"
        "for i in range(4):\n"
        "    with achilles.Pool(1) as p:\n"
        "        assert p.map(abs, [-i]) == [i]\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(code, cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_embedded_cluster_links_in_memory(no_cluster_config):
    """The pool's controller reaches its embedded server in memory (no socket); an admin
    call from the same process does too, and sees the node and the pool's apply job."""
    from achilles import getClusterStatus
    from achilles.net.memlink import MemoryTransport

    with Pool(1) as pool:
        assert pool.apply(abs, (-3,)) == 3
        assert isinstance(pool._ctl.proto.transport, MemoryTransport)
        status = getClusterStatus(
            host="127.0.0.1", port=pool._local.port, secret_key=pool._local.secret
        )
        assert [n["slots"] for n in status["nodes"]] == [1]
        assert len(status["jobs"]) == 1


BIG_MAIN = """
import os, time
from achilles import Pool
BIG = list(range(300_000))          # a __main__ function below refers to it: a big bundle

def f(x):
    return x + len(BIG)

if __name__ == "__main__":
    with Pool(1) as p:
        executor = p._local._node.executor
        print(p.map(f, range(40), chunksize=1) == [x + 300_000 for x in range(40)])
        spool = executor._spool
        print(bool(spool) and os.path.isdir(spool))
        deadline = time.monotonic() + 10
        while os.listdir(spool) and time.monotonic() < deadline:
            time.sleep(0.02)  # sync-ok: a bounded wait for the job's end to reach the node
        print(os.listdir(spool))
    print(os.path.exists(spool))
"""


def test_large_code_bundle_is_spooled_once(tmp_path):
    """A job whose code is large (a __main__ function referring to a big global) runs
    correctly with one chunk per item; its code reaches the workers through a spooled
    file, removed when the job ends, and the spool directory goes with the node."""
    script = tmp_path / "bigmain.py"
    script.write_text(BIG_MAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["True", "True", "[]", "False"]


def test_fork_server_starts_at_import_in_the_main_process_only(tmp_path):
    """`from achilles import Pool` starts the embedded cluster's fork server at once in
    the main process (start-up overlaps the imports), never in a child process that
    imports the user's module (a fork server per worker would be a process each); with
    a cluster configured, not at all."""
    code = (
        "import multiprocessing as mp\n"
        "def child_server(_):\n"
        "    from achilles import Pool\n"
        "    import multiprocess.forkserver as fs\n"
        "    return fs._forkserver._forkserver_pid\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('spawn').Pool(1) as p:\n"
        "        print(p.apply(child_server, (0,)))\n"
        "    print(child_server(0))\n"
    )
    (tmp_path / "prog.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(
        "import runpy; runpy.run_path('prog.py', run_name='__main__')", cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    child, main = out.stdout.split()
    assert child == "None" and main.isdigit()
    env["ACHILLES_HOST"] = "192.0.2.1"  # configured: its pools are remote
    out = run_python(
        "import runpy; runpy.run_path('prog.py', run_name='__main__')", cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]
