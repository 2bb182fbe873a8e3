"""Settings, resolved as: explicit arguments > ``ACHILLES_*`` environment > ``.env`` > defaults.

``.env`` is read from the working directory, or else from the user's config directory
(``~/.config/achilles/.env``; python-dotenv's ``dotenv_values``, which never changes
``os.environ``). ``.env.example`` at the top of the repository lists every key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from dotenv import dotenv_values, set_key

from achilles.errors import ConfigError
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


_CONVERT: dict[str, Any] = {"port": int, "processes": int, "heartbeat_interval": float,
                            "heartbeat_timeout": float, "reconnect_timeout": float,
                            "max_payload": int, "max_attempts": int, "max_connections": int,
                            "handshake_timeout": float, "insecure": _flag}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: keys whose presence means "a cluster is configured" (else Pool() runs a local one)
CLUSTER_KEYS = ("host", "port", "secret_key")


def user_config_dir() -> str:
    """Where a per-user ``.env`` may live: ``$XDG_CONFIG_HOME/achilles`` (or
    ``~/.config/achilles``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".config")
    return os.path.join(base, "achilles")


def _dotenv(path: str | None) -> dict[str, str]:
    """The ``.env`` of the working directory, else the user's (see user_config_dir)."""
    candidates = [path] if path else [os.path.join(os.getcwd(), ".env"),
                                      os.path.join(user_config_dir(), ".env")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return {k: v for k, v in dotenv_values(candidate).items() if v is not None}
    return {}


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
    return Settings(**values)


def cluster_configured(env_file: str | None = None, **explicit: Any) -> bool:
    """Whether arguments, environment or .env point at a cluster."""
    found = _sources(explicit, env_file)
    return any(key in found for key in CLUSTER_KEYS)


def require_secret(settings: Settings, who: str) -> str:
    """The secret to authenticate with; the empty one only for loopback insecure mode."""
    if not settings.secret_key and settings.insecure and settings.host in LOOPBACK:
        return ""
    if not settings.secret_key:
        raise ConfigError(
            f"{who} needs the cluster secret: pass --secret-key / secret_key=, set "
            f"ACHILLES_SECRET_KEY, or write it to .env with achilles.genConfig()")
    return settings.secret_key


def genConfig(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,  # noqa: N802 (seed name)
              username: str | None = None, secret_key: str | None = None,
              path: str = ".env") -> str:
    """Write the cluster's address (and credentials) to a ``.env`` file; return its path.

    Servers, nodes and controllers started in that directory then need no arguments.
    Existing keys in the file are updated; other lines are kept.
    """
    resolve(host=host, port=port, username=username, secret_key=secret_key)  # validate
    path = os.path.abspath(path)
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8"):
            pass
    if secret_key is not None or not os.path.getsize(path):
        os.chmod(path, 0o600)  # it holds the secret: readable by its owner only
    for name, value in (("host", host), ("port", port), ("username", username),
                        ("secret_key", secret_key)):
        if value is not None:
            set_key(path, _ENV[name], str(value), quote_mode="never")
    return path
