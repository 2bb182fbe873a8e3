""".env.example documents every key that achilles.config reads, and nothing else."""

from __future__ import annotations

import os
import re

from achilles import config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _example_keys() -> list[str]:
    with open(os.path.join(ROOT, ".env.example"), encoding="utf-8") as f:
        return re.findall(r"^(ACHILLES_[A-Z_]+)=", f.read(), re.MULTILINE)


def test_env_example_lists_every_config_key():
    """Each Settings field's ACHILLES_* key is in .env.example once, and it has no other."""
    keys = _example_keys()
    assert sorted(keys) == sorted(config._ENV.values())
    assert len(keys) == len(set(keys))


def test_env_example_values_are_accepted(tmp_path, monkeypatch):
    """The example, copied to a .env as it is, resolves without an error."""
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    with open(os.path.join(ROOT, ".env.example"), encoding="utf-8") as f:
        text = f.read()
    env = tmp_path / ".env"
    env.write_text(text)
    os.chmod(env, 0o600)
    settings = config.resolve(env_file=str(env))
    assert settings.port == 9999 and settings.tls == "auto" and settings.max_connections == 1024
