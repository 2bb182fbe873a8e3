"""Layering: the sans-IO core and protocol pull in no I/O library; importing starts nothing.

The imports are measured in fresh interpreters (``sys.executable -c``), because this
test process has long since imported everything. Two children serve all the tests.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

import achilles

PACKAGE_DIR = pathlib.Path(achilles.__file__).parent
#: every module of the sans-IO layers (found, not listed: a new one is checked too)
CORE_MODULES = [
    f"achilles.{layer}.{path.stem}"
    for layer in ("core", "protocol")
    for path in sorted((PACKAGE_DIR / layer).glob("*.py"))
    if path.stem != "__init__"
]
#: never acceptable in the core's import graph
IO_LIBRARIES = ["twisted", "dill", "multiprocess"]
#: forbidden too, unless a bare interpreter already has them at start-up
STDLIB_IO = ["socket", "threading"]

# Records which watched modules are loaded: {"start": [...], "<label>": [...]}.
_PROBE = """
import json, sys
WATCH = {watch!r}
def loaded():
    return sorted({{w for w in WATCH for m in list(sys.modules)
                    if m == w or m.startswith(w + ".")}})
seen = {{"start": loaded()}}
"""
# Loads the core modules without running achilles/__init__.py: a bare package object
# stands in for it, so only the modules' own import graph is measured.
_STUB_PACKAGE = """
import types
pkg = types.ModuleType("achilles")
pkg.__path__ = [{path!r}]
sys.modules["achilles"] = pkg
"""
_IMPORT_CORE = "".join(f"import {name}\n" for name in CORE_MODULES)


def run_probe(body: str, watch: list[str]) -> dict[str, list[str]]:
    code = _PROBE.format(watch=watch) + body + "print(json.dumps(seen))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE_DIR.parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, list[str]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def core_alone() -> dict[str, list[str]]:
    """The core modules imported with the package __init__ bypassed."""
    body = _STUB_PACKAGE.format(path=str(PACKAGE_DIR)) + _IMPORT_CORE + "seen['core'] = loaded()\n"
    return run_probe(body, IO_LIBRARIES + STDLIB_IO)


@pytest.fixture(scope="module")
def through_package() -> dict[str, list[str]]:
    """`import achilles`, then the core modules, imported the normal way."""
    body = (
        "import achilles\nseen['achilles'] = loaded()\n"
        + _IMPORT_CORE
        + "seen['core'] = loaded()\n"
    )
    return run_probe(body, IO_LIBRARIES + ["twisted.internet.reactor"])


def test_core_import_graph_has_no_io_libraries(core_alone: dict[str, Any]) -> None:
    """The core and protocol modules, and what they import, load no twisted/dill/multiprocess."""
    assert [m for m in core_alone["core"] if m in IO_LIBRARIES] == []


def test_importing_core_through_the_package_loads_no_io_libraries(
    through_package: dict[str, Any],
) -> None:
    """Importing the core modules the normal way loads no twisted/dill/multiprocess."""
    assert [m for m in through_package["core"] if m in IO_LIBRARIES] == []


def test_core_import_graph_has_no_socket_or_threading(core_alone: dict[str, Any]) -> None:
    """The core's import graph loads no socket or threading beyond what a bare interpreter has."""
    forbidden = set(STDLIB_IO) - set(core_alone["start"])
    assert [m for m in core_alone["core"] if m in forbidden] == []


def test_worker_module_loads_no_twisted() -> None:
    """The code that runs in a node's worker processes (preloaded by the fork server,
    which must stay small and reactor-free) imports no Twisted."""
    seen = run_probe("import achilles.node.worker\nseen['worker'] = loaded()\n", ["twisted"])
    assert seen["worker"] == []


def test_import_achilles_installs_no_reactor(through_package: dict[str, Any]) -> None:
    """`import achilles` does not import (and so does not install) the Twisted reactor."""
    assert "twisted.internet.reactor" not in through_package["achilles"]
    assert "twisted.internet.reactor" not in through_package["core"]


def test_core_sources_import_only_downward() -> None:
    """Core and protocol sources import no I/O module and no achilles layer above them."""
    banned = set(IO_LIBRARIES) | set(STDLIB_IO) | {"time", "multiprocessing"}
    allowed = {
        "core": ("achilles.core", "achilles.protocol", "achilles.errors"),
        "protocol": ("achilles.protocol", "achilles.errors"),
    }
    problems = []
    for layer, prefixes in allowed.items():
        for path in sorted((PACKAGE_DIR / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in banned or (top == "achilles" and not name.startswith(prefixes)):
                        problems.append(f"{path.name}:{node.lineno} imports {name}")
    assert problems == []
