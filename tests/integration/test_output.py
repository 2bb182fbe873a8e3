"""Task output in the caller: what tasks print (stdout, stderr, warnings) appears in the
caller's streams, prefixed by the node's name, escaped, bounded, and only for the job's
own controller."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
import time

from conftest import child_env, wait_until

from achilles.controller.output import escape, lines
from achilles.protocol.auth import safe_name

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = safe_name(socket.gethostname())  # a node's name when not given one

PRINTING = """
import sys, warnings
from achilles import Pool

def talk(x):
    for i in range(3):
        print(f"task {x} line {i}")
    print(f"task {x} to stderr \\x1b[2J\\rforged", file=sys.stderr)
    if x == 1:
        warnings.warn("careful with 1")
    return x * 10

with Pool({args}) as pool:
    result = pool.map(talk, range(4), chunksize=1)
    sys.stdout.write(f"RESULT {result}\\n")
"""


def _run(code: str, cwd: str, timeout: float = 90, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=dict(child_env(**env), PYTHONPATH=TESTS),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pool_args(cluster, **more) -> str:
    args = dict(host="127.0.0.1", port=cluster.port, secret_key=cluster.secret, **more)
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def test_cli_cluster_output_reaches_caller_prefixed_and_in_order(cluster, tmp_path):
    """On a CLI cluster, each task's prints reach the caller's stdout (stderr and warnings
    its stderr) prefixed with the node's name, in order per task, control characters
    escaped, and before map returns."""
    out = _run(PRINTING.replace("{args}", _pool_args(cluster, forward_output=True)), str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "RESULT [0, 10, 20, 30]" in out.stdout
    lines_out = out.stdout.splitlines()
    for x in range(4):
        mine = [line for line in lines_out if f"task {x} line" in line]
        assert [line.split("] ", 1)[1] for line in mine] == [f"task {x} line {i}" for i in range(3)]
        assert all(line.startswith(f"[{NODE}] ") for line in mine)  # the node's name
        # printed before the result line
        assert lines_out.index(mine[-1]) < lines_out.index("RESULT [0, 10, 20, 30]")
    assert "to stderr \\x1b[2J\\rforged" in out.stderr  # escaped: no cursor moves
    assert "\x1b" not in out.stderr and "\r" not in out.stderr
    assert "UserWarning: careful with 1" in out.stderr
    warn = next(line for line in out.stderr.splitlines() if "careful with 1" in line)
    assert warn.startswith("[") and "] " in warn


def test_output_not_forwarded_when_off_and_not_to_other_controllers(cluster, tmp_path):
    """forward_output=False shows nothing in the caller (the node keeps it), and a second
    program running a job meanwhile never sees another job's output."""
    quiet = (
        "import time\nfrom achilles import Pool\n"
        "def slow(x):\n    time.sleep(0.05)\n    return x\n"
        f"with Pool({_pool_args(cluster, forward_output=True)}) as pool:\n"
        "    print('QUIET', sum(pool.map(slow, range(40), chunksize=1)))\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", quiet],
        env=dict(child_env(), PYTHONPATH=TESTS),
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        off = _run(
            PRINTING.replace("{args}", _pool_args(cluster, forward_output=False)), str(tmp_path)
        )
        on = _run(
            PRINTING.replace("{args}", _pool_args(cluster, forward_output=True)), str(tmp_path)
        )
        other_out, other_err = other.communicate(timeout=90)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert off.returncode == 0 and on.returncode == 0, off.stderr + on.stderr
    assert "task 0 line" not in off.stdout and "careful" not in off.stderr
    assert "task 0 line 0" in on.stdout
    assert other.returncode == 0, other_err
    assert "QUIET 780" in other_out and "task" not in other_out + other_err
    wait_until(lambda: "task 0 line 0" in "".join(n.output() for n in cluster.nodes), 10)


def test_flood_is_truncated_with_a_note_and_does_not_block(cluster, tmp_path):
    """A task printing megabytes: the caller gets the start of it and a note of how much
    was dropped; the job finishes promptly and the next job's output still arrives."""
    code = (
        "import sys, time\nfrom achilles import Pool\n"
        "def flood(x):\n"
        "    for i in range(20000):\n"
        "        print('x' * 100, i)\n"
        "    return x\n"
        "def hello(x):\n    print('after the flood', x)\n    return x\n"
        f"with Pool({_pool_args(cluster, forward_output=True)}) as pool:\n"
        "    t = time.monotonic()\n"
        "    assert pool.map(flood, range(4), chunksize=1) == list(range(4))\n"
        "    sys.stdout.write(f'FLOOD {time.monotonic() - t:.1f}\\n')\n"
        "    assert pool.map(hello, [7]) == [7]\n"
    )
    out = _run(code, str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "more characters of output dropped" in out.stderr
    assert len(out.stdout) < 4 * 64 * 1024  # 2 MB a task printed; about 32 KiB kept each
    assert "after the flood 7" in out.stdout
    seconds = float(next(x for x in out.stdout.splitlines() if x.startswith("FLOOD")).split()[1])
    assert seconds < 30


def test_embedded_cluster_forwards_output(tmp_path):
    """Pool() with no cluster configured: prints come back prefixed with the node name."""
    out = _run(PRINTING.replace("{args}", "2, forward_output=True"), str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "RESULT [0, 10, 20, 30]" in out.stdout
    assert any(line.endswith("] task 3 line 2") for line in out.stdout.splitlines())
    assert "UserWarning: careful with 1" in out.stderr


def test_on_by_default_on_a_terminal(tmp_path):
    """With stdout a terminal (a pty here) and no forward_output given, output is shown;
    with stdout a pipe, it is not (as multiprocessing, where it goes to the terminal)."""
    code = PRINTING.replace("{args}", "2")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the program with the pty as its terminal
        os.chdir(str(tmp_path))
        env = dict(child_env(), PYTHONPATH=TESTS)
        os.execve(sys.executable, [sys.executable, "-c", code], env)
    seen = b""
    deadline = time.monotonic() + 90
    try:
        while b"RESULT" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                seen += data
    finally:
        try:
            os.kill(pid, 9) if b"RESULT" not in seen else None
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode("utf-8", "replace")
    assert "RESULT [0, 10, 20, 30]" in text
    assert "] task 2 line 1" in text
    piped = _run(code, str(tmp_path))
    assert piped.returncode == 0, piped.stderr
    assert "] task 2 line 1" not in piped.stdout


def test_lines_escape_and_distrust_the_payload():
    """The caller's formatting: prefix per line, newline kept, controls escaped, a bad
    payload shown as a note, a cut counted."""
    assert escape("a\x1b[31mb\rc\td\n\u202e") == "a\\x1b[31mb\\rc\td\n\\u202e"
    got = lines("n\x1b1", b'[["out", "one\\ntwo"], ["err", "e"], ["cut", 5]]', 3)
    assert got == [
        ("out", "[n\\x1b1] one\n[n\\x1b1] two\n"),
        ("err", "[n\\x1b1] e\n"),
        ("err", "[n\\x1b1] [... 8 more characters of output dropped]\n"),
    ]
    assert lines("n", b"\xff not json", 0)[0][1].startswith("[n] (unreadable output")
    assert lines("n", b'{"a": 1}', 0)[0][1].startswith("[n] (unreadable output")
    assert lines("n", b'[["out", 3], ["zzz", "x"], 7]', 0) == []


def test_notebook_shows_output_in_the_cell_that_ran_the_job(tmp_path, no_cluster_config):
    """In a Jupyter kernel (nbclient + ipykernel), forwarding is on by default and each
    job's output lands in the cell that ran it, also when the reactor thread was started
    by an earlier cell."""
    import nbformat
    from nbclient import NotebookClient

    cells = [
        "from achilles import Pool\npool = Pool(2)\n"
        "def talk(x):\n    print('said', x)\n    return x\n"
        "pool.map(talk, [1])",
        "pool.map(talk, [2, 3], chunksize=1)",
        "pool.apply(talk, (4,)); pool.close(); pool.join()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    texts = [
        "".join(o.get("text", "") for o in c.outputs if o.get("output_type") == "stream")
        for c in nb.cells
    ]
    assert f"[{NODE}] said 1" in texts[0] and "said 2" not in texts[0]
    assert f"[{NODE}] said 2" in texts[1] and f"[{NODE}] said 3" in texts[1]
    assert f"[{NODE}] said 4" in texts[2] and "said 1" not in texts[1] + texts[2]
