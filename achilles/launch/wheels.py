"""The wheels ``achilles up`` installs on a host: this machine's achilles and every
distribution it needs, repacked from what is installed here, so that a host needs no
package index (``pip install --no-index``) and gets exactly the versions this side runs.

An installed distribution keeps its files, its ``METADATA`` and its ``WHEEL`` (whose tags
say where it runs), which is all a wheel is; :func:`repack` zips them back up with a new
``RECORD``. achilles itself is packed from its package directory (so that a checkout
installed in editable mode ships its current code), and the set is named by a digest of
its contents: a host that already has the same set is not sent it again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import achilles

#: achilles's extras a host gets ("tls": nodes off this machine speak TLS)
EXTRAS = ("tls",)
#: metadata files not carried over (they describe one installation, not the wheel)
_SKIP = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Wheelhouse:
    """A directory of wheels, ready to send; ``digest`` names its contents."""

    path: Path
    digest: str
    files: tuple[str, ...]

    def size(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    def tar(self) -> bytes:
        """The wheels as one uncompressed tar (wheels are zip files already)."""
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for name in self.files:
                tar.add(self.path / name, arcname=name)
        return out.getvalue()


def requirements() -> list[tuple[str, frozenset[str]]]:
    """achilles's own runtime requirements, by name and extras, from its metadata: the
    installed ``METADATA`` when there is one, else ``setup.py``'s list."""
    try:
        reqs = metadata.requires("achilles") or []
    except metadata.PackageNotFoundError:
        reqs = []
    return [r for r in (_parse(line, set(EXTRAS)) for line in reqs) if r is not None]


def _parse(line: str, extras: set[str]) -> tuple[str, frozenset[str]] | None:
    """A ``Requires-Dist`` line as (name, extras), or None when it only applies to an
    extra we did not ask for. Other markers (Python version, platform) are decided by
    what is installed here: this side runs the same Python as the host."""
    spec, _, marker = line.partition(";")
    wanted = _EXTRA_MARKER.search(marker)
    if wanted and wanted.group(1) not in extras:
        return None
    m = _REQ.match(spec)
    if not m:
        return None
    asked = frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
    return m.group(1), asked


def closure() -> list[metadata.Distribution]:
    """Every installed distribution achilles needs (with its extras), and pip (to
    install them with); not achilles itself."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [*requirements(), ("pip", frozenset())]
    while todo:
        name, extras = todo.pop()
        key = canonical(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker for another platform or Python
        if key in seen and not extras:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = _parse(line, set(extras))
            if req is not None and canonical(req[0]) not in seen:
                todo.append(req)
    seen.pop("achilles", None)
    return sorted(seen.values(), key=lambda d: canonical(d.metadata["Name"]))


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _write_wheel(path: Path, dist_info: str, entries: Iterable[tuple[str, bytes]]) -> None:
    """A wheel at ``path`` holding ``entries`` and a RECORD of them, written whole or not
    at all (a half-written wheel must not be taken for a cached one)."""
    record = []
    tmp = path.with_suffix(".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data in entries:
            zf.writestr(name, data)
            record.append(_record_line(name, data))
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    os.replace(tmp, path)


def _tags(wheel_text: str) -> str:
    """The compressed tag set of a ``WHEEL`` file, as a wheel's name carries it."""
    tags = [ln.split(":", 1)[1].strip() for ln in wheel_text.splitlines() if ln.startswith("Tag:")]
    parts = [t.split("-") for t in tags if t.count("-") == 2] or [["py3", "none", "any"]]
    return "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))


def wheel_name(name: str, version: str, tags: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-{tags}.whl"


def repack(dist: metadata.Distribution, out: Path) -> Path:
    """An installed distribution back into a wheel (in ``out``), with its own tags."""
    name, version = dist.metadata["Name"], dist.version
    wheel = dist.read_text("WHEEL") or ""
    path = out / wheel_name(name, version, _tags(wheel))
    if path.exists():
        return path
    files = [f for f in dist.files or [] if _shipped(str(f))]
    dist_info = next(
        (str(f).split("/")[0] for f in files if str(f).split("/")[0].endswith(".dist-info")),
        f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info",
    )
    _write_wheel(
        path,
        dist_info,
        (
            (str(f), Path(str(f.locate())).read_bytes())
            for f in files
            if str(f).split("/")[-1] not in _SKIP or not str(f).startswith(dist_info)
        ),
    )
    return path


def _shipped(rel: str) -> bool:
    """A file of an installed distribution that belongs in its wheel: inside
    site-packages (scripts are made again by pip), not compiled bytecode."""
    return not rel.startswith("..") and "__pycache__" not in rel and not rel.endswith(".pyc")


def _package_files() -> Iterator[tuple[str, Path]]:
    root = Path(achilles.__file__).parent
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root.parent).as_posix()
        if path.is_file() and _shipped(rel):
            yield rel, path


def _achilles_metadata(version: str) -> str:
    """METADATA for achilles's wheel: its name, version and requirements."""
    lines = ["Metadata-Version: 2.1", "Name: achilles", f"Version: {version}"]
    try:
        reqs = metadata.requires("achilles") or []
    except metadata.PackageNotFoundError:
        reqs = []
    lines += [f"Requires-Dist: {r}" for r in reqs]
    lines += [f"Provides-Extra: {e}" for e in EXTRAS]
    return "\n".join(lines) + "\n"


def pack_achilles(out: Path) -> Path:
    version = achilles.__version__
    dist_info = f"achilles-{version}.dist-info"
    path = out / wheel_name("achilles", version, "py3-none-any")
    if path.exists():
        return path
    entries = [(rel, p.read_bytes()) for rel, p in _package_files()]
    entries += [
        (f"{dist_info}/METADATA", _achilles_metadata(version).encode()),
        (
            f"{dist_info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: achilles up\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n",
        ),
        (
            f"{dist_info}/entry_points.txt",
            b"[console_scripts]\nachilles = achilles.cli:main_entry\n"
            b"achilles-node = achilles.cli:node_main\nachilles-server = achilles.cli:server_main\n",
        ),
    ]
    _write_wheel(path, dist_info, entries)
    return path


def digest() -> str:
    """What names a wheel set: this Python, achilles's files, and every dependency's
    name and version (a changed checkout or an upgraded dependency is a new set)."""
    h = hashlib.sha256(f"{sys.implementation.cache_tag}\n".encode())
    for rel, path in _package_files():
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in closure():
        h.update(f"{canonical(dist.metadata['Name'])}=={dist.version}\n".encode())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "achilles" / "wheelhouse"


def build(out: Path | None = None) -> Wheelhouse:
    """The wheel set for this machine's achilles, built once per :func:`digest` (under
    ``~/.cache/achilles/wheelhouse/``, private to this user)."""
    name = digest()
    path = (out or cache_dir()) / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    made = [pack_achilles(path)] + [repack(d, path) for d in closure()]
    return Wheelhouse(path, name, tuple(sorted(p.name for p in made)))
