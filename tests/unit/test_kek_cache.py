"""The host-side KEK cache (pipeline/kek_cache.py): what it trusts, and that a cached key replaces scrypt."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from saveit_backup.errors import ConfigError
from saveit_backup.pipeline import crypto, kek_cache

SALT = b"s" * 16
PARAMS = (1 << 10, 8, 1)
KEK = bytes(range(32))


@pytest.mark.parametrize(("setting", "expected"), [
    ("off", None), ("OFF", None), (" none ", None), ("false", None), ("0", None),
    ("/run/saveit/keys", "/run/saveit/keys"), (" /run/saveit/keys ", "/run/saveit/keys"),
])
def test_resolve(setting: str, expected: str | None) -> None:
    assert kek_cache.resolve(setting) == expected


def test_default_is_per_user_in_memory() -> None:
    if not os.path.isdir("/dev/shm"):
        assert kek_cache.resolve("") is None
    else:
        assert kek_cache.resolve("") == f"/dev/shm/saveit-backup-{os.geteuid()}"


def test_round_trip_per_passphrase_salt_and_parameters(tmp_path: Path) -> None:
    d = str(tmp_path / "cache")
    kek_cache.store(d, "pw", SALT, *PARAMS, KEK)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) == KEK
    assert kek_cache.load(d, "other pw", SALT, *PARAMS) is None
    assert kek_cache.load(d, "pw", b"t" * 16, *PARAMS) is None
    assert kek_cache.load(d, "pw", SALT, 1 << 11, 8, 1) is None
    assert os.stat(d).st_mode & 0o777 == 0o700
    (entry,) = os.listdir(d)
    assert os.stat(os.path.join(d, entry)).st_mode & 0o777 == 0o600
    assert "pw" not in entry and SALT.hex() not in entry


def _stored(tmp_path: Path) -> tuple[str, str]:
    d = str(tmp_path / "cache")
    kek_cache.store(d, "pw", SALT, *PARAMS, KEK)
    return d, os.path.join(d, kek_cache.entry_name("pw", SALT, *PARAMS))


def test_open_directory_is_not_trusted(tmp_path: Path) -> None:
    d, _ = _stored(tmp_path)
    os.chmod(d, 0o755)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None
    kek_cache.store(d, "pw2", SALT, *PARAMS, KEK)  # nor written to
    assert len(os.listdir(d)) == 1


def test_open_file_wrong_size_and_symlinks_are_not_trusted(tmp_path: Path) -> None:
    d, entry = _stored(tmp_path)
    good = Path(entry).read_bytes()
    os.chmod(entry, 0o644)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None
    os.chmod(entry, 0o600)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) == KEK
    Path(entry).write_bytes(good + b"x")
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None
    Path(entry).write_bytes(good)
    link_dir = tmp_path / "link"
    link_dir.symlink_to(d)
    assert kek_cache.load(str(link_dir), "pw", SALT, *PARAMS) is None
    target = tmp_path / "elsewhere"
    os.replace(entry, target)
    os.symlink(target, entry)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None


def test_another_users_entry_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = _stored(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)  # as seen by another user: the files are not theirs
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None


def test_a_damaged_entry_is_not_used_and_gets_replaced(tmp_path: Path) -> None:
    d, entry = _stored(tmp_path)
    damaged = bytearray(Path(entry).read_bytes())
    damaged[3] ^= 0x01  # the key itself: same size, same owner and mode
    Path(entry).write_bytes(bytes(damaged))
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None
    derived = crypto._scrypt.__wrapped__("pw", SALT, *PARAMS, d)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) == derived  # derived again and cached in its place
    assert len(os.listdir(d)) == 1  # no temporary file left


def test_a_fifo_at_the_entry_does_not_hang(tmp_path: Path) -> None:
    import threading

    d, entry = _stored(tmp_path)
    os.unlink(entry)
    os.mkfifo(entry, 0o600)
    result: list[bytes | None] = []
    reader = threading.Thread(target=lambda: result.append(kek_cache.load(d, "pw", SALT, *PARAMS)), daemon=True)
    reader.start()
    reader.join(10)
    assert result == [None]


def test_relative_directory_refused() -> None:
    with pytest.raises(ConfigError, match="absolute"):
        kek_cache.resolve("keys")


def test_unwritable_place_is_not_an_error(tmp_path: Path) -> None:
    kek_cache.store(str(tmp_path / "missing" / "cache"), "pw", SALT, *PARAMS, KEK)
    assert kek_cache.load(str(tmp_path / "missing" / "cache"), "pw", SALT, *PARAMS) is None


def test_a_cached_kek_replaces_scrypt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path / "cache")
    derive = crypto._scrypt.__wrapped__  # without the in-process cache
    derived = derive("pw", SALT, *PARAMS, d)
    assert derived == hashlib.scrypt(b"pw", salt=SALT, n=PARAMS[0], r=PARAMS[1], p=PARAMS[2], dklen=32)

    def no_scrypt(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("scrypt ran")

    monkeypatch.setattr(hashlib, "scrypt", no_scrypt)
    assert derive("pw", SALT, *PARAMS, d) == derived
    with pytest.raises(AssertionError, match="scrypt ran"):
        derive("pw", SALT, *PARAMS, None)
    with pytest.raises(AssertionError, match="scrypt ran"):
        derive("another pw", SALT, *PARAMS, d)
