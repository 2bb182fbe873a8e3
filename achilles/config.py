"""Settings, resolved as: explicit arguments > ``ACHILLES_*`` environment > ``.env`` > defaults.

``.env`` is read from the working directory, or else from the user's config directory
(``~/.config/achilles/.env``; python-dotenv's ``dotenv_values``, which never changes
``os.environ``). ``.env.example`` at the top of the repository lists every key.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from dataclasses import dataclass, fields
from typing import Any

from dotenv import dotenv_values, set_key

from achilles.errors import ConfigError, InsecureConfigWarning
from achilles.protocol.auth import NAME_PATTERN
from achilles.protocol.framing import MAX_PAYLOAD_LENGTH

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    username: str = "achilles"
    secret_key: str | None = None
    processes: int | None = None  # node: workers (None: every core)
    name: str | None = None  # node: its name in the cluster (None: this host's name)
    heartbeat_interval: float = 5.0  # seconds between a node's heartbeats
    heartbeat_timeout: float = 30.0  # server: a node silent this long is lost
    reconnect_timeout: float = 60.0  # controller: give up if the server stays away
    max_payload: int = MAX_PAYLOAD_LENGTH  # bytes in one frame's payload
    max_attempts: int = 3  # tries of a chunk before its job fails
    log_level: str = "INFO"
    max_connections: int = 1024  # server: open connections at once
    handshake_timeout: float = 5.0  # server: seconds a new peer has to authenticate
    insecure: bool = False  # server: no secret, loopback only (explicit opt-in)
    tls_cert: str | None = None  # server: PEM certificate (chain) file: serve TLS
    tls_key: str | None = None  # server: PEM private key file
    tls_ca: str | None = None  # nodes/controllers: PEM CA file to verify the server; TLS on
    #: "auto": a client uses TLS unless the server is on loopback; a server accepts TLS
    #: from anyone and plain TCP from loopback peers. "on": TLS only. "off": plain TCP (a
    #: server then also accepts it from other machines, with a warning).
    tls: str = "auto"
    #: server: where its web dashboard listens, ``[HOST:]PORT`` or ``off`` (see
    #: achilles.web; off loopback it asks for the secret)
    dashboard: str = "127.0.0.1:8999"


_ENV = {f.name: "ACHILLES_" + f.name.upper() for f in fields(Settings)}


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


_CONVERT: dict[str, Any] = {
    "port": int,
    "processes": int,
    "heartbeat_interval": float,
    "heartbeat_timeout": float,
    "reconnect_timeout": float,
    "max_payload": int,
    "max_attempts": int,
    "max_connections": int,
    "handshake_timeout": float,
    "insecure": _flag,
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback: 127.0.0.0/8,
    ``::1`` (also IPv4-mapped), or ``localhost``."""
    return host == "localhost" or host.startswith(("127.", "::1", "::ffff:127."))


TLS_MODES = ("auto", "on", "off")
#: keys whose presence means "a cluster is configured" (else Pool() runs a local one)
CLUSTER_KEYS = ("host", "port", "secret_key")


def user_config_dir() -> str:
    """Where a per-user ``.env`` may live: ``$XDG_CONFIG_HOME/achilles`` (or
    ``~/.config/achilles``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "achilles")


def _dotenv(path: str | None) -> dict[str, str]:
    """The ``.env`` of the working directory, else the user's (see user_config_dir);
    one that another user could have written is ignored, with a warning (see
    :func:`distrust`)."""
    candidates = (
        [path]
        if path
        else [os.path.join(os.getcwd(), ".env"), os.path.join(user_config_dir(), ".env")]
    )
    for candidate in candidates:
        if os.path.isfile(candidate):
            why = distrust(candidate)
            if why:
                warnings.warn(
                    f"ignoring {candidate}: {why}. A .env decides where Pool() "
                    f"sends your code and data; fix its owner and mode (chmod "
                    f"600) if it is yours",
                    InsecureConfigWarning,
                    stacklevel=4,
                )
                continue
            return {k: v for k, v in dotenv_values(candidate).items() if v is not None}
    return {}


def distrust(path: str) -> str:
    """Why a settings file must not be trusted ("" if it may be): it belongs to another
    user (root excepted), others may write it, or it sits in a directory where others
    may replace it (writable by them, without the sticky bit). The way git refuses a
    repository owned by someone else."""
    me = os.getuid()
    for st, what in ((os.lstat(path), "it"), (os.stat(path), "the file it links to")):
        if st.st_uid not in (me, 0):
            return f"{what} belongs to another user (uid {st.st_uid})"
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
            return f"{what} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    folder = os.path.dirname(os.path.abspath(path))
    d = os.stat(folder)
    if d.st_mode & 0o022 and not d.st_mode & stat.S_ISVTX:
        return f"its directory {folder} is writable by other users, who could replace it"
    if d.st_uid not in (me, 0) and d.st_mode & 0o022:
        return f"its directory {folder} belongs to another user and others may write it"
    return ""


def _sources(explicit: dict[str, Any], env_file: str | None) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    dotenv = _dotenv(env_file)
    for name, env_key in _ENV.items():
        if explicit.get(name) is not None:
            found[name] = (explicit[name], f"argument {name!r}")
        elif os.environ.get(env_key):
            found[name] = (os.environ[env_key], f"environment variable {env_key}")
        elif dotenv.get(env_key):
            found[name] = (dotenv[env_key], f"{env_key} in .env")
    return found


def resolve(env_file: str | None = None, **explicit: Any) -> Settings:
    """Build Settings from the four sources; errors name the offending key and source."""
    unknown = set(explicit) - set(_ENV)
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, (value, source) in _sources(explicit, env_file).items():
        convert = _CONVERT.get(name)
        try:
            values[name] = convert(value) if convert else value
        except (TypeError, ValueError):
            kind = "true or false" if convert is _flag else "a number"
            raise ConfigError(f"{source} must be {kind}, got {value!r}") from None
        if name == "port" and not 0 <= values[name] <= 65535:
            raise ConfigError(f"{source} must be a port number 0-65535, got {value!r}")
        if name == "processes" and values[name] < 1:
            raise ConfigError(f"{source} must be at least 1, got {value!r}")
        if name == "secret_key" and not isinstance(value, str):
            raise ConfigError(f"{source} must be a string")
        if name == "host" and not str(value).strip():
            raise ConfigError(f"{source} must not be empty")
        if name == "tls" and str(value).strip().lower() not in TLS_MODES:
            raise ConfigError(f"{source} must be one of {', '.join(TLS_MODES)}, got {value!r}")
        if name == "tls":
            values[name] = str(value).strip().lower()
        if name in ("username", "name") and not re.fullmatch(NAME_PATTERN, str(value)):
            raise ConfigError(
                f"{source} must be 1-64 letters, digits or ._@:+- (starting "
                f"with a letter or digit), got {str(value)[:80]!r}"
            )
    return Settings(**values)


def cluster_configured(env_file: str | None = None, **explicit: Any) -> bool:
    """Whether arguments, environment or .env point at a cluster."""
    found = _sources(explicit, env_file)
    return any(key in found for key in CLUSTER_KEYS)


def require_secret(settings: Settings, who: str) -> str:
    """The secret to authenticate with; the empty one only for loopback insecure mode."""
    if not settings.secret_key and settings.insecure and is_loopback(settings.host):
        return ""
    if not settings.secret_key:
        raise ConfigError(
            f"{who} needs the cluster secret: pass --secret-key / secret_key=, set "
            f"ACHILLES_SECRET_KEY, or write it to .env with achilles.genConfig()"
        )
    return settings.secret_key


def genConfig(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    username: str | None = None,
    secret_key: str | None = None,
    path: str = ".env",
) -> str:
    """Write the cluster's address (and credentials) to a ``.env`` file; return its path.

    Servers, nodes and controllers started in that directory then need no arguments.
    Existing keys in the file are updated; other lines are kept.
    """
    resolve(host=host, port=port, username=username, secret_key=secret_key)  # validate
    path = os.path.abspath(path)
    if os.path.islink(path):
        raise ConfigError(
            f"{path} is a symbolic link: genConfig does not follow it (it "
            f"would change the file it points to); remove it first"
        )
    private = secret_key is not None or not os.path.exists(path)
    _private_file(path, chmod=private)
    for name, value in (
        ("host", host),
        ("port", port),
        ("username", username),
        ("secret_key", secret_key),
    ):
        if value is not None:
            set_key(path, _ENV[name], str(value), quote_mode="never")
    if private:  # set_key rewrites the file; it holds the secret: its owner's only
        _private_file(path, chmod=True)
    return path


def _private_file(path: str, chmod: bool) -> None:
    """Create ``path`` (mode 0600) if missing, and make it 0600 if asked, without ever
    following a symbolic link put there meanwhile."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if chmod:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
