"""examples/notebook_demo.ipynb runs headless in a real Jupyter kernel (nbclient +
ipykernel): cells' functions and classes on nodes, interleaved calls, an interrupt,
await / async for, pools made again, and killCluster."""

from __future__ import annotations

import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


def _run(tmp_path) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(ROOT, "examples", "notebook_demo.ipynb"), as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return nb


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_notebook_on_embedded_cluster(tmp_path, no_cluster_config):
    """With nothing configured, every cell runs on the embedded cluster."""
    nb = _run(tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "(178, 871)" in _text(code[1])
    assert "Vector(8, -8)" in _text(code[2])
    assert "interrupted" in _text(code[5]) and "[1, 2]" in _text(code[5])
    assert "([0, 1, 7, 2, 5, 8, 16, 3, 19, 6], [0, 1, 7, 2, 5])" in _text(code[6])
    assert "6" in _text(code[7])


def test_notebook_against_cluster_and_kill(fresh_cluster, tmp_path, monkeypatch):
    """Against a CLI cluster the same notebook runs, and killCluster stops the nodes."""
    cluster = fresh_cluster(nodes=2)
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ACHILLES_PORT", str(cluster.port))
    monkeypatch.setenv("ACHILLES_SECRET_KEY", cluster.secret)
    monkeypatch.setenv("ACHILLES_DEMO_KILL", "1")
    nb = _run(tmp_path)
    assert "2 node(s) told to stop" in _text(nb.cells[-1])
    for node in cluster.nodes:
        assert node.popen.wait(20) == 0
