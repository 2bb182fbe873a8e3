"""Settings: args > ACHILLES_* environment > .env > defaults, validation, genConfig."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from achilles.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Settings,
    cluster_configured,
    genConfig,
    require_secret,
    resolve,
)
from achilles.errors import ConfigError

# Port *values* for configuration parsing: nothing listens on them in these tests.
DOTENV_PORT, ARG_PORT, HIGHEST_PORT, SOME_PORT, GEN_PORT, OTHER_PORT = (
    1111,
    3333,
    65535,
    1234,
    5555,
    6000,
)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ACHILLES_* variables and an empty working directory, for every test."""
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_env(path: Path, **values: object) -> None:
    path.joinpath(".env").write_text(
        "".join(f"ACHILLES_{k.upper()}={v}\n" for k, v in values.items()), encoding="utf-8"
    )


# --- precedence ---------------------------------------------------------------------------
def test_defaults_when_nothing_is_set() -> None:
    """With no arguments, environment or .env, resolve() gives the defaults."""
    assert resolve() == Settings()
    assert resolve().host == DEFAULT_HOST and resolve().port == DEFAULT_PORT


def test_dotenv_overrides_defaults(tmp_path: Path) -> None:
    """A .env in the working directory overrides the defaults, converting types."""
    write_env(tmp_path, port=DOTENV_PORT, host="10.0.0.1", heartbeat_timeout="2.5")
    settings = resolve()
    assert (settings.port, settings.host, settings.heartbeat_timeout) == (
        DOTENV_PORT,
        "10.0.0.1",
        2.5,
    )
    assert settings.username == "achilles"


def test_environment_overrides_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An ACHILLES_* variable overrides the same key in .env, key by key."""
    write_env(tmp_path, port=DOTENV_PORT, host="10.0.0.1")
    monkeypatch.setenv("ACHILLES_PORT", "2222")
    assert (resolve().port, resolve().host) == (2222, "10.0.0.1")


def test_argument_overrides_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An explicit argument overrides the environment and .env; None means not given."""
    write_env(tmp_path, port=DOTENV_PORT)
    monkeypatch.setenv("ACHILLES_PORT", "2222")
    assert resolve(port=ARG_PORT).port == ARG_PORT
    assert resolve(port=None).port == 2222


def test_each_source_supplies_its_own_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keys come from the highest source that sets them, mixing all four sources."""
    write_env(tmp_path, host="dotenv-host", port=DOTENV_PORT, username="dotenv-user")
    monkeypatch.setenv("ACHILLES_PORT", "2222")
    monkeypatch.setenv("ACHILLES_USERNAME", "env-user")
    settings = resolve(username="arg-user")
    assert (settings.host, settings.port, settings.username, settings.max_attempts) == (
        "dotenv-host",
        2222,
        "arg-user",
        3,
    )


def test_empty_environment_variable_falls_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An empty ACHILLES_* variable counts as unset."""
    write_env(tmp_path, port=DOTENV_PORT)
    monkeypatch.setenv("ACHILLES_PORT", "")
    assert resolve().port == DOTENV_PORT


def test_explicit_env_file(tmp_path: Path) -> None:
    """env_file= reads that file instead of ./.env."""
    other = tmp_path / "cluster.env"
    other.write_text("ACHILLES_PORT=4444\n", encoding="utf-8")
    write_env(tmp_path, port=DOTENV_PORT)
    assert resolve(env_file=str(other)).port == 4444


def test_unknown_argument_is_type_error() -> None:
    """An unknown setting name is a TypeError naming it."""
    with pytest.raises(TypeError, match="prot"):
        resolve(prot=1)


# --- validation ---------------------------------------------------------------------------
def test_non_number_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-number port in the environment is a ConfigError naming the variable."""
    monkeypatch.setenv("ACHILLES_PORT", "abc")
    with pytest.raises(ConfigError) as info:
        resolve()
    assert "environment variable ACHILLES_PORT" in str(info.value)
    assert "'abc'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_non_number_in_dotenv(tmp_path: Path) -> None:
    """A non-number in .env is a ConfigError naming the key and the file."""
    write_env(tmp_path, max_attempts="many")
    with pytest.raises(ConfigError, match=r"ACHILLES_MAX_ATTEMPTS in \.env"):
        resolve()


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_port_out_of_range_argument(port: int) -> None:
    """A port outside 0-65535 is a ConfigError naming the argument."""
    with pytest.raises(ConfigError, match=r"argument 'port' must be a port number"):
        resolve(port=port)


def test_port_out_of_range_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port outside 0-65535 in the environment names the variable."""
    monkeypatch.setenv("ACHILLES_PORT", "70000")
    with pytest.raises(ConfigError, match="environment variable ACHILLES_PORT"):
        resolve()


def test_port_bounds_are_accepted() -> None:
    """Ports 0 and 65535 are valid."""
    assert resolve(port=0).port == 0
    assert resolve(port=HIGHEST_PORT).port == HIGHEST_PORT


def test_processes_below_one_refused() -> None:
    """processes must be at least 1."""
    with pytest.raises(ConfigError, match="argument 'processes'"):
        resolve(processes=0)


def test_empty_host_refused() -> None:
    """A blank host is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match="argument 'host'"):
        resolve(host="  ")


# --- cluster_configured / require_secret --------------------------------------------------
def test_cluster_not_configured_by_default() -> None:
    """Nothing set, or only non-cluster keys, means no cluster is configured."""
    assert cluster_configured() is False
    assert cluster_configured(username="someone", processes=2) is False


def test_cluster_configured_from_each_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Host, port or secret from any source means a cluster is configured."""
    assert cluster_configured(port=SOME_PORT) is True
    monkeypatch.setenv("ACHILLES_HOST", "10.1.1.1")
    assert cluster_configured() is True
    monkeypatch.delenv("ACHILLES_HOST")
    write_env(tmp_path, secret_key="s")
    assert cluster_configured() is True


def test_require_secret_returns_it_or_explains() -> None:
    """require_secret returns the secret, or names who needs it and every way to set it."""
    assert require_secret(Settings(secret_key="s3"), "node") == "s3"
    with pytest.raises(ConfigError) as info:
        require_secret(Settings(), "the server")
    text = str(info.value)
    assert text.startswith("the server needs the cluster secret")
    for hint in ("--secret-key", "secret_key=", "ACHILLES_SECRET_KEY", "genConfig"):
        assert hint in text


# --- genConfig ----------------------------------------------------------------------------
def test_genconfig_writes_file_that_resolve_reads(tmp_path: Path) -> None:
    """genConfig writes .env in the working directory and resolve() then reads it back."""
    path = genConfig(host="10.2.3.4", port=GEN_PORT, username="ann", secret_key="s3cr3t")
    assert path == str(tmp_path / ".env")
    settings = resolve()
    assert (settings.host, settings.port, settings.username, settings.secret_key) == (
        "10.2.3.4",
        GEN_PORT,
        "ann",
        "s3cr3t",
    )


def test_genconfig_creates_file_private() -> None:
    """A .env created by genConfig is readable by its owner only (mode 0o600)."""
    path = genConfig(secret_key="s3cr3t")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_genconfig_keeps_unrelated_lines_and_updates_keys(tmp_path: Path) -> None:
    """genConfig updates its keys in an existing .env and keeps every other line."""
    (tmp_path / ".env").write_text(
        "# my settings\nOTHER_TOOL=1\nACHILLES_PORT=1\n", encoding="utf-8"
    )
    genConfig(port=OTHER_PORT, secret_key="k")
    text = (tmp_path / ".env").read_text(encoding="utf-8")
    assert "# my settings\n" in text and "OTHER_TOOL=1\n" in text
    assert text.count("ACHILLES_PORT=") == 1
    assert resolve().port == OTHER_PORT and resolve().secret_key == "k"


def test_genconfig_validates_before_writing(tmp_path: Path) -> None:
    """An invalid port is refused and no file is written."""
    with pytest.raises(ConfigError, match="port"):
        genConfig(port=123456)
    assert not (tmp_path / ".env").exists()


def test_user_config_dir_env_is_read_when_cwd_has_none(monkeypatch, tmp_path) -> None:
    """With no .env in the working directory, $XDG_CONFIG_HOME/achilles/.env is used;
    the working directory's .env wins over it."""
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    home = tmp_path / "cfg"
    (home / "achilles").mkdir(parents=True)
    (home / "achilles" / ".env").write_text("ACHILLES_PORT=4321\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.chdir(work)
    assert resolve().port == 4321
    (work / ".env").write_text("ACHILLES_PORT=1234\n")
    assert resolve().port == SOME_PORT
