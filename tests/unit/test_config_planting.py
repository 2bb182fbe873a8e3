"""A settings file another user could have written is not trusted: a planted ``.env``
would otherwise decide where ``Pool()`` sends the user's code and data. And genConfig
never follows a symbolic link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from achilles.config import cluster_configured, distrust, genConfig, resolve
from achilles.errors import ConfigError, InsecureConfigWarning

PLANTED_PORT = 4444  # a value in a file: nothing listens on it
NOBODY = 65534


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-user-config"))
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.chdir(work)
    return work


def plant(folder: Path, mode: int = 0o600, uid: int | None = None) -> Path:
    env = folder / ".env"
    env.write_text(
        f"ACHILLES_HOST=10.9.9.9\nACHILLES_PORT={PLANTED_PORT}\n"
        "ACHILLES_SECRET_KEY=the-attackers-secret\n"
    )
    env.chmod(mode)
    if uid is not None:
        os.chown(env, uid, -1)
    return env


def test_own_private_file_is_used(clean: Path) -> None:
    plant(clean)
    assert distrust(str(clean / ".env")) == ""
    assert resolve().port == PLANTED_PORT


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")


@pytest.mark.parametrize(
    "mode,uid,why",
    [
        (0o666, None, "writable by other users"),
        (0o620, None, "writable by other users"),
        pytest.param(0o600, NOBODY, "belongs to another user", marks=needs_root),
    ],
)
def test_planted_file_is_ignored_with_a_warning(
    clean: Path, mode: int, uid: int | None, why: str
) -> None:
    """Pool() would have been the planted cluster's client: now nothing is configured
    (so Pool() runs its own local cluster), and the warning names the file and why."""
    env = plant(clean, mode, uid)
    with pytest.warns(InsecureConfigWarning, match=why) as caught:
        assert not cluster_configured()
    assert str(env) in str(caught[0].message)
    with pytest.warns(InsecureConfigWarning):
        assert resolve().port != PLANTED_PORT


def test_file_in_a_directory_others_may_write_is_ignored(clean: Path) -> None:
    """Others could replace a file in a world-writable folder without the sticky bit."""
    shared = clean / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    plant(shared)
    assert "directory" in distrust(str(shared / ".env"))
    shared.chmod(0o1777)  # sticky (like /tmp): others cannot replace our file
    assert distrust(str(shared / ".env")) == ""


def test_symlink_to_a_planted_file_is_ignored(clean: Path, tmp_path: Path) -> None:
    target = plant(tmp_path, 0o666)
    (clean / ".env").symlink_to(target)
    assert "links to" in distrust(str(clean / ".env"))


def test_genconfig_refuses_a_symlink_and_leaves_its_target_alone(
    clean: Path, tmp_path: Path
) -> None:
    """Before, genConfig chmod-ed the link's target to 0600 (and wrote into it)."""
    target = tmp_path / "someone-elses-file"
    target.write_text("keep me\n")
    target.chmod(0o644)
    (clean / ".env").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        genConfig("10.0.0.1", 5555, secret_key="s3cret-s3cret-s3cret")
    assert target.read_text() == "keep me\n"
    assert (target.stat().st_mode & 0o777) == 0o644


def test_genconfig_writes_a_private_file(clean: Path) -> None:
    path = genConfig("10.0.0.1", 5555, secret_key="s3cret-s3cret-s3cret")
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert distrust(path) == ""
    assert resolve().port == 5555
