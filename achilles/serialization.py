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

import importlib.abc
import importlib.machinery
import importlib.util
import io
import os
import pickle
import sys
import sysconfig
import types
from typing import Any, Callable

import dill

from achilles.errors import RemoteError, SerializationError

PROTOCOL = 5


# --- code bundles --------------------------------------------------------------------
def _stdlib_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get("stdlib"), paths.get("platstdlib")}
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


def _local_module(name: str | None) -> types.ModuleType | None:
    """The module if it is one of the user's own source files, not an installed one."""
    if not name or name == "__main__" or name.split(".")[0] in ("achilles", "dill"):
        return None
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or not path or not path.endswith(".py"):
        return None
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts or real.startswith(_stdlib_roots()):
        return None
    return module


def _refs(objects: list[Any]) -> set[str]:
    names: set[str] = set()
    for obj in objects:
        if isinstance(obj, types.ModuleType):
            names.add(obj.__name__)
        else:
            names.add(getattr(obj, "__module__", None) or "")
            globs = getattr(obj, "__globals__", None)
            if globs is not None:
                names.update(getattr(v, "__module__", None) or getattr(v, "__name__", "")
                             for v in globs.values()
                             if isinstance(v, (types.ModuleType, type, types.FunctionType)))
    return names


def _local_sources(objects: list[Any]) -> dict[str, str]:
    """Sources of local modules the objects refer to, and of what those refer to."""
    sources: dict[str, str] = {}
    todo = _refs(objects)
    while todo:
        name = todo.pop()
        module = _local_module(name)
        if module is None or name in sources:
            continue
        with open(module.__file__, encoding="utf-8") as f:  # type: ignore[arg-type]
            sources[name] = f.read()
        if "." in name:
            todo.add(name.rsplit(".", 1)[0])
        todo |= _refs([v for v in vars(module).values()
                       if isinstance(v, (types.ModuleType, type, types.FunctionType))])
    return sources


def _main_namespace() -> dict[str, Any]:
    main = sys.modules.get("__main__")
    return {name: obj for name, obj in vars(main).items()
            if isinstance(obj, (type, types.FunctionType))
            and getattr(obj, "__module__", None) == "__main__"} if main else {}


def dumps_function(fn: Callable[..., Any], mode: str = "map",
                   initializer: Callable[..., Any] | None = None,
                   initargs: tuple[Any, ...] = ()) -> bytes:
    """Serialise a job's code once: ``mode`` is ``map``, ``star`` or ``apply``.

    Raises:
        SerializationError: naming what could not be serialised.
    """
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    main = {}
    for name, obj in _main_namespace().items():  # each alone: one bad class must not
        try:                                     # stop the job that does not use it
            dill.dumps(obj, recurse=True)
            main[name] = obj
        except Exception:
            pass
    try:
        sources = _local_sources([fn, initializer, *main.values()])
        body = dill.dumps({"fn": fn, "mode": mode, "initializer": initializer,
                           "initargs": tuple(initargs), "main": main}, recurse=True)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialise function {getattr(fn, '__qualname__', fn)!r} "
            f"with dill: {exc.__class__.__name__}: {exc}") from exc
    return pickle.dumps((sources, body), protocol=PROTOCOL)


class _ShippedSources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the caller's local modules from shipped sources, when nothing else can."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name not in self.sources:
            return None
        is_pkg = any(other.startswith(name + ".") for other in self.sources)
        return importlib.machinery.ModuleSpec(name, self, is_package=is_pkg)

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return None

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        module.__file__ = f"<achilles shipped {module.__name__}>"
        exec(compile(self.sources[module.__name__], module.__file__, "exec"), vars(module))


_FINDER = _ShippedSources()


def loads_function(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`dumps_function`, on a node's worker."""
    sources, body = pickle.loads(data)
    if sources:
        for name, src in sources.items():
            _FINDER.sources.setdefault(name, src)
        if _FINDER not in sys.meta_path:
            sys.meta_path.append(_FINDER)
    bundle: dict[str, Any] = dill.loads(body)
    return bundle


# --- data chunks ---------------------------------------------------------------------
def _main_global(qualname: str) -> Any:
    obj: Any = sys.modules["__main__"]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _ResultPickler(pickle.Pickler):
    """Pickles the caller's ``__main__`` classes and functions back by reference."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) \
                and getattr(obj, "__module__", None) == "__main__":
            return _main_global, (obj.__qualname__,)
        return NotImplemented


class _JobUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, namespace: dict[str, Any]) -> None:
        super().__init__(io.BytesIO(data))
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
        SerializationError: when neither pickle nor dill can serialise it.
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
            raise SerializationError(
                f"cannot pickle {'results' if by_reference else 'arguments'}: "
                f"{first.__class__.__name__}: {first}; dill: {exc}") from exc


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
