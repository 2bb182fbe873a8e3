"""How code and data cross the wire.

* Code: a job's function, initializer and initargs, plus the classes and functions
  defined in the caller's ``__main__`` (a script or notebook), go in one ``dill`` bundle
  (``recurse=True``), made once per job. Sources of the caller's own local modules
  (files that are not installed packages) ride along, so nodes without those files
  can import them.
* Data: argument and result chunks use the C ``pickle`` (protocol 5): dill's
  pure-Python pickler is 16-37x slower on plain data. ``dill`` is only the fallback
  for what pickle refuses.
* ``__main__`` objects are pickled by reference in data. A worker resolves such a
  reference in the job's shipped namespace, and pickles instances of those classes back
  by reference, so the caller gets its own classes: ``isinstance`` and ``except`` hold.

Pure functions, no I/O; the server never calls any of this.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import linecache
import os
import pickle
import sys
import sysconfig
import types
from collections.abc import Callable
from typing import Any

import dill

from achilles.errors import RemoteError, SerializationError

PROTOCOL = 5


# --- code bundles --------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _stdlib_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get("stdlib"), paths.get("platstdlib")}
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


_is_local: dict[tuple[str, int], bool] = {}


def _local_module(name: str | None) -> types.ModuleType | None:
    """The module if it is one of the user's own source files, not an installed one."""
    if not name or name == "__main__" or name.split(".")[0] in ("achilles", "dill"):
        return None
    module = sys.modules.get(name)
    if module is None:
        return None
    key = (name, id(module))  # resolving real paths costs: once per module object
    local = _is_local.get(key)
    if local is None:
        path: str = getattr(module, "__file__", None) or ""
        local = path.endswith(".py")
        if local:
            real = os.path.realpath(path)
            parts = real.split(os.sep)
            local = not (
                "site-packages" in parts
                or "dist-packages" in parts
                or real.startswith(_stdlib_roots())
            )
        _is_local[key] = local
    return module if local else None


_CODE = (types.ModuleType, type, types.FunctionType)


def _names(values: Any) -> set[str]:
    """Modules that these values are, or come from."""
    return {
        str(getattr(v, "__module__", None) or getattr(v, "__name__", ""))
        for v in values
        if isinstance(v, _CODE)
    }


def _refs(objects: list[Any]) -> set[str]:
    """Modules the objects come from; for ``__main__`` functions, also the modules of what
    their globals hold (a local module's own references are followed in _module_refs)."""
    names: set[str] = set()
    scanned: set[int] = set()  # every __main__ function shares one globals dict
    for obj in objects:
        if isinstance(obj, types.ModuleType):
            names.add(obj.__name__)
            continue
        names.add(getattr(obj, "__module__", None) or "")
        globs = getattr(obj, "__globals__", None)
        if globs is not None and id(globs) not in scanned and globs.get("__name__") == "__main__":
            scanned.add(id(globs))
            names |= _names(globs.values())
    return names


_module_refs_cache: dict[int, tuple[Any, set[str]]] = {}


def _module_refs(module: types.ModuleType) -> set[str]:
    """What a local module's top level refers to (computed once per module object)."""
    cached = _module_refs_cache.get(id(module))
    if cached is None or cached[0] is not module:
        cached = (module, _names(vars(module).values()))
        _module_refs_cache[id(module)] = cached
    return cached[1]


_source_cache: dict[str, tuple[int, int, str]] = {}


def _read_source(path: str) -> str:
    """A module's source, re-read only when the file changed (mtime and size)."""
    st = os.stat(path)
    cached = _source_cache.get(path)
    if cached is None or cached[:2] != (st.st_mtime_ns, st.st_size):
        with open(path, encoding="utf-8") as f:
            cached = (st.st_mtime_ns, st.st_size, f.read())
        _source_cache[path] = cached
    return cached[2]


def _local_sources(objects: list[Any]) -> dict[str, str]:
    """Sources of the local modules the objects come from, and of the local modules those
    refer to. A package's ``__init__`` goes along (so its submodules import) but is not
    followed: what a package happens to have imported is not needed."""
    sources: dict[str, str] = {}
    todo = _refs(objects)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        module = _local_module(name)
        if module is None:
            continue
        sources[name] = _read_source(module.__file__)  # type: ignore[arg-type]
        parent = name.rpartition(".")[0]
        while parent:
            package = _local_module(parent)
            if package is not None:
                sources[parent] = _read_source(package.__file__)  # type: ignore[arg-type]
            parent = parent.rpartition(".")[0]
        todo |= _module_refs(module) - seen
    return sources


def _main_namespace() -> dict[str, Any]:
    main = sys.modules.get("__main__")
    return (
        {
            name: obj
            for name, obj in vars(main).items()
            if isinstance(obj, (type, types.FunctionType))
            and getattr(obj, "__module__", None) == "__main__"
        }
        if main
        else {}
    )


class _MainPickler(dill.Pickler):
    """dill, with the caller's ``__main__`` classes as references into the shipped
    namespace, so a function and its arguments agree on one class object."""

    def __init__(self, file: Any, classes: dict[int, str]) -> None:
        super().__init__(file, protocol=PROTOCOL, recurse=True)
        self._classes = classes

    def persistent_id(self, obj: Any) -> Any:
        name = self._classes.get(id(obj))
        return None if name is None else ("__main__", name)


class _MainUnpickler(dill.Unpickler):
    def __init__(self, file: Any, namespace: dict[str, Any]) -> None:
        super().__init__(file)
        self._namespace = namespace

    def persistent_load(self, pid: Any) -> Any:
        return self._namespace[pid[1]]


_main_cache: dict[tuple[Any, ...], tuple[bytes, dict[int, str]]] = {}


def _namespace_key(namespace: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((name, id(obj)) for name, obj in namespace.items()))


def _main_bundle(
    namespace: dict[str, Any] | None = None, key: tuple[Any, ...] | None = None
) -> tuple[bytes, dict[int, str]]:
    """The caller's ``__main__`` classes and functions, by value (dill), for resolving
    references in arguments and results on the nodes. Pickling them costs milliseconds,
    so the bytes are kept while the namespace holds the same objects."""
    if namespace is None:
        namespace = _main_namespace()
    if key is None:
        key = _namespace_key(namespace)
    cached = _main_cache.get(key)
    if cached is not None:
        return cached
    keep = {}
    for name, obj in namespace.items():  # each alone: one class that will not pickle
        try:  # must not stop a job that does not use it
            dill.dumps(obj, recurse=True)
            keep[name] = obj
        except Exception:
            pass
    data = dill.dumps(keep, protocol=PROTOCOL, recurse=True) if keep else b""
    classes = {id(obj): name for name, obj in keep.items() if isinstance(obj, type)}
    _main_cache.clear()
    _main_cache[key] = (data, classes)
    return data, classes


def _from_main(obj: Any) -> bool:
    return getattr(obj, "__module__", None) == "__main__"


def dumps_function(
    fn: Callable[..., Any],
    mode: str = "map",
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    pool_id: str = "",
    maxtasks: int | None = None,
) -> bytes:
    """Serialise a job's code once: ``mode`` is ``map``, ``star`` or ``apply``.

    Functions that pickle by reference (module-level functions of installed or local
    modules, builtins) go with the C pickle, in microseconds; lambdas, closures and
    ``__main__`` functions go by value with dill. ``pool_id`` lets workers run a pool's
    initializer once, not once per job, and count the pool's tasks: a worker that has run
    ``maxtasks`` of them (the pool's ``maxtasksperchild``; None: no limit) is replaced.

    Raises:
        SerializationError: naming what could not be serialised.
    """
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    namespace = _main_namespace()
    main_key = _namespace_key(namespace)
    key = (id(fn), mode, id(initializer), id(initargs), pool_id, maxtasks, main_key)
    hit = _bundles.get(key)
    if (
        hit is not None
        and hit[0][0] is fn
        and hit[0][1] is initializer
        and hit[0][2] is initargs
        and _unchanged(hit[1])
    ):
        return hit[2]
    data, sources = _dumps_function(
        fn, mode, initializer, initargs, pool_id, maxtasks, namespace, main_key
    )
    if len(_bundles) >= _MAX_BUNDLES:
        del _bundles[next(iter(_bundles))]
    _bundles[key] = ((fn, initializer, initargs), _stamps(sources), data)
    return data


#: bundles made, by function and ``__main__`` state (an apply makes the same one each
#: call: 30-60 us of namespace walking and pickling, on every call's path otherwise)
_bundles: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Any, ...], bytes]] = {}
_MAX_BUNDLES = 64


def _stamps(sources: dict[str, str]) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of each shipped module's file, to notice an edit."""
    out = []
    for name in sources:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _unchanged(stamps: tuple[tuple[str, int, int], ...]) -> bool:
    for path, mtime, size in stamps:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_mtime_ns, st.st_size) != (mtime, size):
            return False
    return True


def _dumps_function(
    fn: Callable[..., Any],
    mode: str,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    pool_id: str,
    maxtasks: int | None,
    namespace: dict[str, Any],
    main_key: tuple[Any, ...],
) -> tuple[bytes, dict[str, str]]:
    name = getattr(fn, "__qualname__", fn)
    try:
        main, classes = _main_bundle(namespace, main_key)
        sources = _local_sources([fn, initializer, *namespace.values()])
        parts = {
            "fn": fn,
            "mode": mode,
            "initializer": initializer,
            "initargs": tuple(initargs),
            "pool": pool_id,
            "maxtasks": maxtasks,
        }
        body = None
        if not _from_main(fn) and not _from_main(initializer):
            try:
                body = b"P" + pickle.dumps(parts, protocol=PROTOCOL)
            except Exception:  # a lambda, a closure, a bound method of a local object...
                body = None
        if body is None:
            buf = io.BytesIO()
            _MainPickler(buf, classes).dump(parts)
            body = b"D" + buf.getvalue()
    except Exception as exc:
        raise SerializationError(
            f"cannot serialise function {name!r} with dill: {exc.__class__.__name__}: {exc}"
        ) from exc
    # each shipped module's path on the caller's machine: its frames are named by it in
    # a node's tracebacks, whose lines come from the shipped source (see exec_module)
    paths = {name: getattr(_local_module(name), "__file__", None) for name in sources}
    return pickle.dumps((sources, main, body, paths), protocol=PROTOCOL), sources


class _ShippedSources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the caller's local modules from shipped sources, when nothing else can."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self.paths: dict[str, str] = {}  # where each module is on the caller's machine

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name not in self.sources:
            return None
        is_pkg = any(other.startswith(name + ".") for other in self.sources)
        return importlib.machinery.ModuleSpec(name, self, is_package=is_pkg)

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return None

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        """Named by the caller's path (tracebacks, IDE links), with its lines in
        linecache: the file need not exist here. An entry without an mtime is one that
        ``linecache.checkcache`` keeps."""
        source = self.sources[module.__name__]
        path = self.paths.get(module.__name__) or f"<achilles shipped {module.__name__}>"
        module.__file__ = path
        linecache.cache[path] = (len(source), None, source.splitlines(True), path)
        exec(compile(source, path, "exec"), vars(module))


_FINDER = _ShippedSources()
_loaded: dict[bytes, Any] = {}  # worker side: bundles already loaded, by content


def _load_cached(kind: str, data: bytes, load: Callable[[], Any]) -> Any:
    key = kind.encode() + hashlib.blake2b(data, digest_size=16).digest()
    value = _loaded.get(key)
    if value is None:
        value = load()
        if len(_loaded) > 64:
            _loaded.clear()
        _loaded[key] = value
    return value


def loads_function(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`dumps_function`, on a node's worker: a dict of ``fn``, ``mode``,
    ``initializer``, ``initargs``, ``pool`` (its id), ``maxtasks`` and ``main`` (the
    shipped ``__main__`` namespace). A bundle seen before (the same bytes) is not loaded
    again: a pool's many ``apply`` calls pay once."""
    sources, main, body, paths = pickle.loads(data)
    if sources:
        for name, src in sources.items():
            _FINDER.sources.setdefault(name, src)
            if paths.get(name):
                _FINDER.paths.setdefault(name, paths[name])
        if _FINDER not in sys.meta_path:
            sys.meta_path.append(_FINDER)
    namespace: dict[str, Any] = _load_cached("M", main, lambda: dill.loads(main)) if main else {}

    def load_body() -> dict[str, Any]:
        stream = io.BytesIO(body)
        stream.read(1)
        if body[:1] == b"P":
            parts: dict[str, Any] = _JobUnpickler(stream, namespace).load()
        else:
            parts = _MainUnpickler(stream, namespace).load()
        parts["main"] = namespace
        parts.setdefault("maxtasks", None)  # a bundle from before maxtasksperchild
        return parts

    return _load_cached("B" + str(id(namespace)), body, load_body)


# --- data chunks ---------------------------------------------------------------------
def _main_global(qualname: str) -> Any:
    obj: Any = sys.modules["__main__"]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _ResultPickler(pickle.Pickler):
    """Pickles the caller's ``__main__`` classes and functions back by reference."""

    def reducer_override(self, obj: Any) -> Any:
        if (
            isinstance(obj, (type, types.FunctionType))
            and getattr(obj, "__module__", None) == "__main__"
        ):
            return _main_global, (obj.__qualname__,)
        return NotImplemented


class _JobUnpickler(pickle.Unpickler):
    def __init__(self, data: Any, namespace: dict[str, Any]) -> None:
        super().__init__(data if hasattr(data, "read") else io.BytesIO(data))
        self.namespace = namespace

    def find_class(self, module: str, name: str) -> Any:
        if module in ("__main__", "__mp_main__") and name in self.namespace:
            return self.namespace[name]
        if module == "achilles.serialization" and name == "_main_global":
            return self._main_global
        return super().find_class(module, name)

    def _main_global(self, qualname: str) -> Any:
        head = qualname.split(".")[0]
        if head in self.namespace:
            obj = self.namespace[head]
            for part in qualname.split(".")[1:]:
                obj = getattr(obj, part)
            return obj
        return _main_global(qualname)


def dumps_chunk(items: Any, by_reference: bool = False) -> bytes:
    """Pickle a chunk with C pickle; fall back to dill for what pickle refuses.

    Args:
        items: the chunk (a list of arguments or of results).
        by_reference: pickle ``__main__`` classes by name (a worker sending results).

    Raises:
        Whatever pickle raised (as multiprocessing would), when dill cannot either;
        the note on it says so.
    """
    try:
        if by_reference:
            buf = io.BytesIO()
            _ResultPickler(buf, protocol=PROTOCOL).dump(items)
            return buf.getvalue()
        return pickle.dumps(items, protocol=PROTOCOL)
    except Exception as first:
        try:
            return dill.dumps(items, protocol=PROTOCOL, recurse=True)
        except Exception as exc:
            # pickle's own exception, as multiprocessing raises it (same type), with
            # what we tried in a note
            first.add_note(
                f"achilles: cannot pickle the "
                f"{'results' if by_reference else 'arguments'} of a chunk "
                f"(with pickle, nor with dill: {exc.__class__.__name__}: {exc})"
            )
            raise first from exc


def loads_chunk(data: bytes, namespace: dict[str, Any] | None = None) -> Any:
    """Unpickle a chunk; ``namespace`` resolves a job's shipped ``__main__`` names."""
    if namespace:
        return _JobUnpickler(data, namespace).load()
    return pickle.loads(data)


# --- exceptions ----------------------------------------------------------------------
def dumps_exception(exc: BaseException, tb: str) -> bytes:
    """Pickle ``(exception, traceback text)``; an exception that will not round-trip
    becomes a :class:`RemoteError` carrying its type name and text."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    try:
        data = dumps_chunk((exc, tb), by_reference=True)
        pickle.loads(data) if getattr(type(exc), "__module__", "") != "__main__" else None
        return data
    except Exception:
        text = f"{exc}"
        return pickle.dumps((RemoteError(type(exc).__qualname__, text), tb), protocol=PROTOCOL)


def loads_exception(data: bytes) -> tuple[BaseException, str]:
    try:
        exc, tb = pickle.loads(data)
    except Exception as err:
        return SerializationError(f"the task's exception could not be unpickled: {err}"), ""
    return exc, tb
