"""Repository rules on the in-memory backend: format refusal, commit marker, lock, encryption mismatch."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from saveit_backup.domain.manifest import Manifest, ObjectEntry
from saveit_backup.errors import EncryptionConfigError, LockHeld, RepositoryFormatError, RepositoryNotInitialized
from saveit_backup.pipeline.crypto import Keyring
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository
from saveit_backup.storage.base import read_all
from saveit_backup.storage.memory import MemoryStorage


def test_uninitialised_and_unknown_version() -> None:
    storage = MemoryStorage()
    with pytest.raises(RepositoryNotInitialized):
        Repository(storage).load_config()
    storage.put(layout.CONFIG, json.dumps({"format": "saveit-backup", "format_version": 2, "repository_id": "x"}).encode())
    with pytest.raises(RepositoryFormatError, match="version 2"):
        Repository(storage).load_config()
    storage.put(layout.CONFIG, json.dumps({"format": "saveit-backup", "format_version": 1, "repository_id": "x",
                                           "encryption": {"cipher": "rot13"}}).encode())
    with pytest.raises(RepositoryFormatError, match="rot13"):
        Repository(storage).load_config()


def test_backup_visible_only_after_manifest_commit() -> None:
    repo = Repository(MemoryStorage())
    repo.init()
    digest = repo.put_object(layout.object_key("20260101-000000L", "database.dump"), [b"data"])
    assert repo.backup_ids() == ([], ["20260101-000000L"])
    assert repo.manifests() == []
    m = Manifest(id="20260101-000000L", type="logical", started="2026-01-01T00:00:00Z", finished="2026-01-01T00:00:01Z",
                 objects=[ObjectEntry("database.dump", digest.plain_size, digest.stored_size, digest.plain_digest, "zstd", "none")])
    repo.commit(m)
    assert [x.id for x in repo.manifests()] == [m.id] and repo.manifests()[0].checksum_ok
    repo.delete_backup(m.id)
    assert repo.backup_ids() == ([], [])


def test_manifest_checksum_detects_edits() -> None:
    storage = MemoryStorage()
    repo = Repository(storage)
    repo.init()
    repo.commit(Manifest(id="20260101-000000L", type="logical", started="2026-01-01T00:00:00Z"))
    body = json.loads(read_all(storage, layout.manifest_key("20260101-000000L")))
    body["database"] = "tampered"
    storage.put(layout.manifest_key("20260101-000000L"), json.dumps(body).encode())
    assert not repo.load_manifest("20260101-000000L").checksum_ok


def test_encryption_settings_must_match_repository() -> None:
    storage = MemoryStorage()
    Repository(storage).init()
    with pytest.raises(EncryptionConfigError, match="initialised without encryption"):
        Repository(storage, Keyring(passphrase="x")).write_options()
    enc = MemoryStorage()
    Repository(enc, Keyring(passphrase="x")).init()
    with pytest.raises(EncryptionConfigError, match="repository is encrypted"):
        Repository(enc).write_options()
    assert Repository(enc, Keyring(passphrase="x")).write_options().encrypt


def test_lock_refuses_second_writer_and_breaks_stale_locks() -> None:
    storage = MemoryStorage()
    repo = Repository(storage)
    with repo.lock("backup"), pytest.raises(LockHeld, match="locked by 'backup'"), repo.lock("expire"):
        pass
    assert list(storage.list(layout.LOCK)) == []
    # A lock of a dead process on this host is stale.
    storage.put(layout.LOCK, json.dumps({"owner": "x", "host": socket.gethostname(), "pid": 2**22 + 7, "command": "backup",
                                         "started": "t", "heartbeat": time.time()}).encode())
    with repo.lock("backup"):
        pass
    # A lock from another host is stale only once its heartbeat is old.
    fresh = {"owner": "y", "host": "elsewhere", "pid": os.getpid(), "command": "backup", "started": "t", "heartbeat": time.time()}
    storage.put(layout.LOCK, json.dumps(fresh).encode())
    with pytest.raises(LockHeld), repo.lock("backup"):
        pass
    storage.put(layout.LOCK, json.dumps({**fresh, "heartbeat": time.time() - 3600}).encode())
    with repo.lock("backup"):
        pass


def test_new_backup_ids_never_collide() -> None:
    repo = Repository(MemoryStorage())
    repo.init()
    first, _ = repo.new_backup_id("logical")
    repo.put_object(layout.object_key(first, "x"), [b"1"])  # even an uncommitted backup holds its ID
    second, _ = repo.new_backup_id("logical")
    assert second != first and second > first
