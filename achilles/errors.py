"""The achilles exception hierarchy.

Everything we raise derives from :class:`AchillesError`; where a stdlib exception already
says the same thing (a timeout, a broken pool) we also derive from it, so code written
for ``multiprocessing`` keeps catching what it used to catch.
"""

from __future__ import annotations

from typing import Any


class AchillesError(Exception):
    """Root of every error achilles raises itself."""


class ConfigError(AchillesError, ValueError):
    """A setting is missing or invalid; the message names the key."""


class InsecureConfigWarning(UserWarning):
    """A settings file was ignored: another user could have written it."""


class ProtocolError(AchillesError):
    """A peer sent bytes that break the wire protocol.

    ``code`` is a short machine-readable reason sent back in the error frame.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class AuthenticationError(AchillesError):
    """The peer does not hold the cluster secret (or we could not prove that we do)."""


class VersionMismatchError(AuthenticationError):
    """The peers run incompatible protocol or Python versions."""


class SerializationError(AchillesError):
    """A function, argument, result or exception could not be (de)serialised."""


class ChunkFailedError(AchillesError):
    """A chunk could not be completed after ``max_attempts`` tries.

    ``seq`` is the chunk number, ``start``/``stop`` the positions of its arguments in
    the input (``None`` when unknown).
    """

    def __init__(
        self,
        message: str,
        seq: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> None:
        super().__init__(message)
        self.seq = seq
        self.start = start
        self.stop = stop


class ConnectionLostError(AchillesError, ConnectionError):
    """The server could not be reached, or stayed away longer than allowed."""


class ReactorStopped(AchillesError):
    """The reactor thread stopped while a caller was waiting on it."""


class RemoteError(AchillesError):
    """Stands in for a task's exception that could not be pickled back.

    ``type_name`` names the original type; the message is the original ``str(exc)``.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (RemoteError, (self.type_name, self.message))


def rebuild_exc(exc: BaseException, tb: str) -> BaseException:
    """Attach the remote traceback text to ``exc`` as its cause, as multiprocessing does."""
    exc.__cause__ = __getattr__("RemoteTraceback")(tb)
    return exc


def _make_timeout_error() -> type:
    import multiprocessing  # not at import time: it pulls in socket, and the core must not

    class TimeoutError(AchillesError, multiprocessing.TimeoutError):
        """A wait or a task went past its time limit (a multiprocessing.TimeoutError)."""

    TimeoutError.__module__ = __name__
    TimeoutError.__qualname__ = "TimeoutError"
    return TimeoutError


def _make_remote_traceback() -> type:
    from multiprocessing import pool  # not at import time (see _make_timeout_error)

    base: Any = vars(pool)["RemoteTraceback"]  # not in typeshed's stub

    class RemoteTraceback(base):
        """Carries the text of a traceback raised on a node; used as ``__cause__``. A
        ``multiprocessing.pool.RemoteTraceback``, as multiprocessing's pool gives."""

        def __init__(self, tb: str) -> None:
            super().__init__(tb)
            self.tb = tb

        def __str__(self) -> str:
            return self.tb

    RemoteTraceback.__module__ = __name__
    return RemoteTraceback


def _make_result_encoding_error() -> type:
    from multiprocessing import pool

    base: Any = vars(pool)["MaybeEncodingError"]  # not in typeshed's stub

    class ResultEncodingError(base, SerializationError):
        """A task's result could not be pickled to be sent back: multiprocessing's
        ``MaybeEncodingError`` (``.exc`` and ``.value`` are the reprs of the pickling
        error and of the result), and an achilles ``SerializationError``."""

        def __reduce__(self):  # type: ignore[no-untyped-def]
            # rebuilt from the reprs themselves, not repr'd again
            return (_rebuild_encoding_error, (self.exc, self.value))

    ResultEncodingError.__module__ = __name__
    return ResultEncodingError


def _rebuild_encoding_error(exc: str, value: str) -> BaseException:
    cls = __getattr__("ResultEncodingError")
    err = cls.__new__(cls)
    err.exc, err.value = exc, value
    err.args = (exc, value)
    return err


_LAZY = {
    "TimeoutError": _make_timeout_error,
    "RemoteTraceback": _make_remote_traceback,
    "ResultEncodingError": _make_result_encoding_error,
}


def __getattr__(name: str) -> Any:
    """The classes that subclass multiprocessing's, made on first use."""
    if name in globals():
        return globals()[name]
    if name in _LAZY:
        cls = _LAZY[name]()
        cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
