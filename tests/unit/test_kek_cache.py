"""The host-side KEK cache (pipeline/kek_cache.py): what it trusts, and that a cached key replaces scrypt."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from saveit_backup.pipeline import crypto, kek_cache

SALT = b"s" * 16
PARAMS = (1 << 10, 8, 1)
KEK = bytes(range(32))


@pytest.mark.parametrize(("setting", "expected"), [
    ("off", None), ("OFF", None), (" none ", None), ("false", None), ("0", None),
    ("/run/saveit/keys", "/run/saveit/keys"),
    ("", f"/dev/shm/saveit-backup-{os.geteuid()}" if os.path.isdir("/dev/shm") else None),
])
def test_resolve(setting: str, expected: str | None) -> None:
    assert kek_cache.resolve(setting) == expected


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
    os.chmod(entry, 0o644)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None
    os.chmod(entry, 0o600)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) == KEK
    Path(entry).write_bytes(KEK + b"x")
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None
    Path(entry).write_bytes(KEK)
    link_dir = tmp_path / "link"
    link_dir.symlink_to(d)
    assert kek_cache.load(str(link_dir), "pw", SALT, *PARAMS) is None
    target = tmp_path / "elsewhere"
    os.replace(entry, target)
    os.symlink(target, entry)
    assert kek_cache.load(d, "pw", SALT, *PARAMS) is None


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
