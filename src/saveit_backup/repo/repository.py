"""The repository: format check, write-once objects, manifests as commit markers, lock."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from saveit_backup import __version__
from saveit_backup.errors import (
    AlreadyExists,
    BackupNotFound,
    EncryptionConfigError,
    LockHeld,
    NotFound,
    RepositoryFormatError,
    RepositoryNotInitialized,
)
from saveit_backup.pipeline.crypto import Keyring, b64d, b64e
from saveit_backup.pipeline.envelope import Digest, EncodeOptions, decode, decode_reader, encode
from saveit_backup.repo import layout
from saveit_backup.storage.base import Storage, read_all

if TYPE_CHECKING:
    import logging
    from datetime import datetime

    from saveit_backup.domain.manifest import Manifest

# Kept off the wal-push path (its cold start): logging, socket, threading and the manifest model load when used.

FORMAT_VERSION = 1
CIPHERS = ("none", "aes-256-gcm")
LOCK_HEARTBEAT_SECONDS = 30.0
LOCK_STALE_SECONDS = 300.0


class RepoConfig(NamedTuple):
    repository_id: str
    created: str
    cipher: str
    scrypt_salt: bytes | None

    @property
    def encrypted(self) -> bool:
        return self.cipher != "none"

    def to_json(self) -> bytes:
        enc: dict[str, Any] = {"cipher": self.cipher}
        if self.scrypt_salt:
            enc["scrypt_salt"] = b64e(self.scrypt_salt)
        body = {"format": "saveit-backup", "format_version": FORMAT_VERSION, "repository_id": self.repository_id,
                "created": self.created, "encryption": enc}
        return json.dumps(body, indent=1).encode()

    @classmethod
    def parse(cls, raw: bytes) -> RepoConfig:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise RepositoryFormatError("repository config.json is not valid JSON") from exc
        if body.get("format") != "saveit-backup":
            raise RepositoryFormatError("this location holds something that is not a saveit-backup repository")
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise RepositoryFormatError(f"repository format version {version} is not supported (this build reads {FORMAT_VERSION})")
        enc = body.get("encryption") or {}
        cipher = enc.get("cipher", "none")
        if cipher not in CIPHERS:
            raise RepositoryFormatError(f"repository cipher {cipher!r} is not supported")
        salt = enc.get("scrypt_salt")
        return cls(body["repository_id"], body.get("created", ""), cipher, b64d(salt) if salt else None)


class Repository:
    def __init__(self, storage: Storage, keyring: Keyring | None = None, options: EncodeOptions | None = None) -> None:
        self.storage = storage
        self.keyring = keyring or Keyring()
        self.options = options or EncodeOptions()
        self._config: RepoConfig | None = None

    # --- config ------------------------------------------------------------------
    def init(self, exist_ok: bool = False) -> RepoConfig:
        """Create config.json; encryption follows the keys configured now."""
        try:
            existing = self.load_config()
        except RepositoryNotInitialized:
            existing = None
        if existing is not None:
            if exist_ok:
                return existing
            raise AlreadyExists(f"a repository already exists at {self.storage.capabilities.url}", hint="use it as it is")
        encrypted = self.keyring.can_write_encrypted or bool(self.keyring.identities)
        import uuid

        from saveit_backup.domain.manifest import iso, utcnow

        config = RepoConfig(uuid.uuid4().hex, iso(utcnow()), "aes-256-gcm" if encrypted else "none",
                            os.urandom(16) if encrypted else None)
        try:
            self.storage.put(layout.CONFIG, config.to_json(), if_absent=True)
        except AlreadyExists:
            pass  # another process initialised it first: use theirs
        self._config = None
        return self.load_config()

    def load_config(self) -> RepoConfig:
        if self._config is None:
            try:
                raw = read_all(self.storage, layout.CONFIG)
            except NotFound:
                raise RepositoryNotInitialized(f"no saveit-backup repository at {self.storage.capabilities.url}") from None
            self._config = RepoConfig.parse(raw)
            if self._config.scrypt_salt:
                self.keyring.scrypt_salt = self._config.scrypt_salt
        return self._config

    def ensure(self, auto_init: bool) -> RepoConfig:
        try:
            return self.load_config()
        except RepositoryNotInitialized:
            if not auto_init:
                raise
            return self.init(exist_ok=True)

    def write_options(self) -> EncodeOptions:
        """Encoding for new objects; refuses keys/repository mismatches."""
        config = self.load_config()
        if config.encrypted and not self.keyring.can_write_encrypted:
            raise EncryptionConfigError(
                "the repository is encrypted but no BACKUP_ENCRYPTION_PASSPHRASE or BACKUP_ENCRYPTION_RECIPIENTS is set")
        if not config.encrypted and self.keyring.can_write_encrypted:
            raise EncryptionConfigError(
                "encryption keys are configured but the repository was initialised without encryption",
                hint="use a new repository for encrypted backups (repo init with the keys set), or unset the keys",
            )
        return EncodeOptions(self.options.codec, self.options.level, self.options.threads, encrypt=config.encrypted)

    # --- objects ---------------------------------------------------------------------
    def put_object(self, key: str, chunks: Iterable[bytes], options: EncodeOptions | None = None) -> Digest:
        digest = Digest()
        self.storage.put(key, encode(chunks, options or self.write_options(), self.keyring, digest), if_absent=True)
        return digest

    def read_object(self, key: str) -> Iterator[bytes]:
        return decode(self.storage.open(key), self.keyring, what=key)

    def object_reader(self, key: str) -> io.RawIOBase:
        """The plain bytes of an object as a raw file (``envelope.decode_reader``: the caller checks the size)."""
        return decode_reader(self.storage.open(key), self.keyring, what=key)

    # --- manifests -------------------------------------------------------------------
    def commit(self, manifest: Manifest) -> None:
        self.storage.put(layout.manifest_key(manifest.id), manifest.to_json(), if_absent=True)

    def load_manifest(self, backup_id: str) -> Manifest:
        try:
            raw = read_all(self.storage, layout.manifest_key(backup_id))
        except NotFound:
            raise BackupNotFound(f"backup {backup_id} not found in {self.storage.capabilities.url}") from None
        from saveit_backup.domain.manifest import Manifest

        try:
            return Manifest.from_dict(json.loads(raw))
        except ValueError as exc:
            raise RepositoryFormatError(f"manifest of {backup_id}: {exc}") from exc

    def backup_ids(self) -> tuple[list[str], list[str]]:
        """(committed, uncommitted) backup IDs, oldest first."""
        committed: set[str] = set()
        seen: set[str] = set()
        for info in self.storage.list(layout.BACKUPS, hidden=True):
            parts = info.key[len(layout.BACKUPS) :].split("/")
            if len(parts) < 2:
                continue
            seen.add(parts[0])
            if parts[1] == "manifest.json" and len(parts) == 2:  # the committed manifest, not its temporary
                committed.add(parts[0])
        return sorted(committed), sorted(seen - committed)

    def manifests(self) -> list[Manifest]:
        return [self.load_manifest(i) for i in self.backup_ids()[0]]

    def resolve(self, ref: str) -> Manifest:
        if ref == "latest":
            found = self.manifests()
            if not found:
                raise BackupNotFound(f"the repository at {self.storage.capabilities.url} holds no backup")
            return found[-1]
        return self.load_manifest(ref)

    def new_backup_id(self, kind: str) -> tuple[str, datetime]:
        """A fresh ID (one-second resolution): wait for the next second if this one is taken. Call under the lock."""
        from saveit_backup.domain.manifest import backup_id, utcnow

        while True:
            started = utcnow()
            bid = backup_id(kind, started)
            if not any(True for _ in self.storage.list(layout.backup_prefix(bid), hidden=True)):
                return bid, started
            time.sleep(1.0 - started.microsecond / 1e6 + 0.01)

    def pinned_ids(self) -> set[str]:
        return {info.key[len(layout.PINS) :] for info in self.storage.list(layout.PINS)}

    def pin(self, backup_id: str, pinned: bool) -> None:
        """A pinned backup is kept by retention whatever its age (docs/format.md, pins/)."""
        self.load_manifest(backup_id)  # BackupNotFound for a typo
        if pinned:
            from saveit_backup.domain.manifest import iso, utcnow

            self.storage.put(layout.pin_key(backup_id), json.dumps({"pinned": iso(utcnow())}).encode())
        else:
            self.storage.delete(layout.pin_key(backup_id))

    def delete_backup(self, backup_id: str) -> None:
        """Manifest first: from then on the backup is uncommitted, never half-visible."""
        self.storage.delete(layout.manifest_key(backup_id))
        self.delete_uncommitted(backup_id)
        self.storage.delete(layout.pin_key(backup_id))

    def delete_uncommitted(self, backup_id: str) -> None:
        for info in list(self.storage.list(layout.backup_prefix(backup_id), hidden=True)):
            self.storage.delete(info.key)

    # --- lock --------------------------------------------------------------------------
    @contextmanager
    def lock(self, command: str, stale_after: float = LOCK_STALE_SECONDS) -> Iterator[None]:
        import socket
        import threading
        import uuid

        from saveit_backup.domain.manifest import iso, utcnow

        owner = uuid.uuid4().hex
        started = iso(utcnow())

        def body() -> bytes:
            return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "command": command,
                               "started": started, "heartbeat": time.time()}).encode()

        self._acquire(body, stale_after)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(LOCK_HEARTBEAT_SECONDS):
                try:
                    if self._lock_owner() == owner:
                        self.storage.put(layout.LOCK, body())
                except Exception as exc:  # the next beat retries; the job goes on
                    _log().warning("lock heartbeat failed: %s", exc)

        thread = threading.Thread(target=beat, name="lock-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            if self._lock_owner() == owner:
                self.storage.delete(layout.LOCK)

    def _lock_owner(self) -> str | None:
        try:
            return str(json.loads(read_all(self.storage, layout.LOCK)).get("owner"))
        except NotFound:
            return None

    def _acquire(self, body: Any, stale_after: float) -> None:
        for _ in range(3):
            try:
                self.storage.put(layout.LOCK, body(), if_absent=True)
                return
            except AlreadyExists:
                pass
            try:
                held = json.loads(read_all(self.storage, layout.LOCK))
            except NotFound:
                continue  # released meanwhile
            except ValueError:
                held = {}
            reason = _stale_reason(held, stale_after)
            if reason is None:
                raise LockHeld(
                    f"repository is locked by '{held.get('command')}' (pid {held.get('pid')} on {held.get('host')},"
                    f" since {held.get('started')})"
                )
            _log().warning("breaking stale repository lock of '%s' (pid %s on %s): %s",
                        held.get("command"), held.get("pid"), held.get("host"), reason)
            self.storage.delete(layout.LOCK)
        raise LockHeld("could not take the repository lock after breaking a stale one")


def _log() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)


def _stale_reason(held: dict[str, Any], stale_after: float) -> str | None:
    import socket

    if not held:
        return "lock file is unreadable"
    if held.get("host") == socket.gethostname():
        pid = int(held.get("pid", 0))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} is not running"
        except PermissionError:
            pass
    age = time.time() - float(held.get("heartbeat", 0))
    if age > stale_after:
        return f"no heartbeat for {age:.0f} s"
    return None


def tool_version() -> str:
    return __version__
