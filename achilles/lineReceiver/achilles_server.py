"""The seed's ``runAchillesServer`` and ``genConfig``: :func:`achilles.server.listen`, blocking."""

from __future__ import annotations

import logging
import sys
import threading

from achilles.config import genConfig as _gen_config
from achilles.config import resolve
from achilles.errors import ConfigError


def _no_secret(who: str, argument: bool = True) -> ConfigError:
    ways = "pass secret_key=, set" if argument else "set"
    return ConfigError(
        f"{who} needs the cluster secret (nodes and controllers prove they hold it): "
        f"{ways} ACHILLES_SECRET_KEY, or write it to .env in the working directory with "
        f"genConfig(host, port, username, secret_key)"
    )


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def runAchillesServer(
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> None:
    """Run a server until the process is interrupted (SIGINT/SIGTERM).

    Settings: arguments > ``ACHILLES_*`` environment > ``.env`` in the working directory
    > defaults (127.0.0.1:9999). ``port=0`` picks a free port; the line printed shows
    the real one. ``username`` is accepted for the seed's sake; the secret is what
    authenticates peers.

    Raises:
        ConfigError: no secret, or an invalid setting.
    """
    settings = resolve(host=host, port=port, username=username, secret_key=secret_key)
    if not settings.secret_key:
        raise _no_secret("runAchillesServer")
    from achilles.net.reactor import reactor as global_reactor

    reactor = global_reactor()

    from achilles import server

    _logging(settings.log_level)
    bound = server.listen(settings, reactor).getHost()
    print(f"ALERT: achilles_server initiated at {bound.host}:{bound.port}", flush=True)
    print("Listening for connections...", flush=True)
    reactor.run(installSignalHandlers=threading.current_thread() is threading.main_thread())


def genConfig(
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> str:
    """Write the given settings to ``.env`` in the working directory; return its path.

    ``runAchillesServer()``, ``runAchillesNode()`` and ``map`` started in that directory
    then need no arguments. Settings passed as None are left as they are in the file.
    """
    path = _gen_config(host, port, username, secret_key)  # type: ignore[arg-type]
    print(
        f"Successfully generated .env configuration file at {path}. Use genConfig() to overwrite.",
        flush=True,
    )
    return path


__all__ = ["genConfig", "runAchillesServer"]
