"""Pool() with nothing configured runs on an embedded local cluster, and cleans it up."""
from __future__ import annotations

import os

import pytest
from conftest import ROOT, run_python, wait_until

from achilles import Pool


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_embedded_cluster_runs_and_stops(no_cluster_config):
    """Pool(2) starts a local server+node, maps correctly, and stops it on terminate."""
    with Pool(2) as pool:
        pid = pool._local.pid
        assert pool._processes == 2
        assert pool.map(abs, range(-5, 5)) == [abs(x) for x in range(-5, 5)]
        assert list(pool.imap(str, range(3))) == ["0", "1", "2"]
    wait_until(lambda: _gone(pid), 10, what="the local cluster to exit")


def test_close_join_stops_embedded_cluster(no_cluster_config):
    """close() then join() waits for the work, then stops the local cluster."""
    pool = Pool(1)
    pid = pool._local.pid
    r = pool.map_async(abs, [-1, -2])
    pool.close()
    pool.join()
    assert r.get(1) == [1, 2]
    wait_until(lambda: _gone(pid), 10, what="the local cluster to exit")


SCRIPT = '''
from achilles import Pool          # the only line changed from a multiprocessing script

def f(x):
    return x * x

if __name__ == "__main__":
    with Pool(2) as p:
        print(p.map(f, range(10)))
        print(sum(p.imap_unordered(f, range(100))))
'''


def test_unchanged_script_runs(tmp_path):
    """A multiprocessing-style script runs unchanged with `from achilles import Pool`."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
                     cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str([x * x for x in range(10)]), "328350"]


def test_exit_while_map_pending_does_not_hang(tmp_path):
    """A process that exits while a map_async is still running exits promptly, and its
    embedded cluster goes with it."""
    code = ("import achilles, time\n"
            "p = achilles.Pool(1)\n"
            "print(p._local.pid, flush=True)\n"
            "r = p.map_async(time.sleep, [30])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(code, cwd=tmp_path, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    wait_until(lambda: _gone(pid), 10, what="the local cluster to exit")


def test_repeated_use_in_one_process(tmp_path):
    """Many pools, one after another, in one process (as in a notebook) all work."""
    code = ("import achilles\n"
            "for i in range(4):\n"
            "    with achilles.Pool(1) as p:\n"
            "        assert p.map(abs, [-i]) == [i]\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    out = run_python(code, cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
