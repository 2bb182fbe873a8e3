"""Every example in examples/ and every python block of the README runs, as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, child_env

EXAMPLES = {
    "squares.py": r"^\[0, 1, 4, 9, 16, 25, 36, 49, 64, 81\]\n100 328350\n1000 332833500\n$",
    "monte_carlo_pi.py": r"^pi is about 3\.1\d* \(1,600,000 darts\)\n$",
    "imap_generator.py": r"^hashed 200,000 records\n$",
}


def test_every_example_is_tested():
    """Each script in examples/ has an expected output here."""
    scripts = {f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")}
    assert scripts == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path):
    """The example prints what it should, on the embedded cluster (nothing configured)."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert re.match(EXAMPLES[name], out.stdout), out.stdout


def _readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_has_python_blocks():
    """The README's runnable examples are found (```python blocks)."""
    assert _readme_blocks()


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_block_runs(index, tmp_path):
    """Each ```python block of the README runs without error."""
    script = tmp_path / "block.py"
    script.write_text(_readme_blocks()[index])
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
