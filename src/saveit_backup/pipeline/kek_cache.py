"""Host-side cache of passphrase-derived key-encryption keys (KEKs) between processes.

Every ``wal-push`` (``archive_command``) and ``wal-fetch`` (``restore_command``) is a new process,
and scrypt at the repository's parameters (n = 2^15, r = 8) costs 70-130 ms and 32 MiB here: more
than the rest of a push.  The first process stores the KEK it derived; the next ones read it.

* Where: ``BACKUP_KEY_CACHE_DIR``; by default ``/dev/shm/saveit-backup-<uid>`` (memory only, gone
  at reboot); ``off`` disables the cache.
* One file per (passphrase, salt, scrypt parameters), named by HMAC-SHA256(passphrase, salt and
  parameters), holding the 32-byte KEK and HMAC-SHA256(passphrase, name and KEK): another passphrase
  uses another file, and a damaged entry is noticed (and replaced) instead of sealing data with a
  wrong key.
* A cached KEK is used only from a directory that is not a symlink and a regular file, both owned by
  this process's user and closed to group and others (checked on the open descriptors); anything
  else is ignored and the KEK derived.  The cache only saves time: none of its failures is an error.

Exposure: the file opens what the passphrase opens (passphrase slots), and is readable only by
the user who already reads the passphrase (its configuration file or environment).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from saveit_backup.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.hmac import HMAC

KEK_SIZE = 32
TAG_SIZE = 32
DISABLED = frozenset({"off", "none", "false", "no", "0"})
_NAME_CONTEXT = b"saveit-backup kek cache v1"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def resolve(setting: str) -> str | None:
    """The cache directory for a ``key_cache_dir`` setting: empty means the default, ``off`` none."""
    value = setting.strip()
    if value.lower() in DISABLED:
        return None
    if value:
        if not os.path.isabs(value):
            raise ConfigError(f"BACKUP_KEY_CACHE_DIR={value!r} is not an absolute path",
                              hint="give an absolute directory (archive_command runs in the data directory), or off")
        return value
    return f"/dev/shm/saveit-backup-{os.geteuid()}" if os.path.isdir("/dev/shm") else None


def _mac(passphrase: str, *parts: bytes) -> HMAC:
    # cryptography's HMAC: its library is loaded for AES-GCM anyway; the standard library's hmac and
    # hashlib would load OpenSSL again (3-4 ms a call)
    from cryptography.hazmat.primitives import hashes, hmac

    mac = hmac.HMAC(passphrase.encode(), hashes.SHA256())
    mac.update(b"|".join([_NAME_CONTEXT, *parts]))
    return mac


def _hmac(passphrase: str, *parts: bytes) -> bytes:
    return bytes(_mac(passphrase, *parts).finalize())


def entry_name(passphrase: str, salt: bytes, n: int, r: int, p: int) -> str:
    return _hmac(passphrase, salt.hex().encode(), b"%d|%d|%d" % (n, r, p)).hex()


def _tag(passphrase: str, name: str, kek: bytes) -> bytes:
    return _hmac(passphrase, b"entry", name.encode(), kek)


def _tag_matches(passphrase: str, name: str, kek: bytes, tag: bytes) -> bool:
    """In constant time (``HMAC.verify``)."""
    from cryptography.exceptions import InvalidSignature

    try:
        _mac(passphrase, b"entry", name.encode(), kek).verify(tag)
    except InvalidSignature:
        return False
    return True


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _open_dir(directory: str) -> int | None:
    """The directory, opened without following a link, if it is private (see the module contract)."""
    dfd = os.open(directory, _DIR_FLAGS)
    if _private(os.fstat(dfd)):
        return dfd
    os.close(dfd)
    return None


def load(directory: str, passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes | None:
    """The cached KEK, or None (missing, damaged or not trusted: see the module contract)."""
    try:
        name = entry_name(passphrase, salt, n, r, p)
        dfd = _open_dir(directory)
        if dfd is None:
            return None
        try:  # O_NONBLOCK: a FIFO planted at the name must not hang archive_command
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) and _private(st) and st.st_size == KEK_SIZE + TAG_SIZE):
                return None
            data = os.read(fd, KEK_SIZE + TAG_SIZE + 1)
        finally:
            os.close(fd)
        kek, tag = data[:KEK_SIZE], data[KEK_SIZE:]
        return kek if len(data) == KEK_SIZE + TAG_SIZE and _tag_matches(passphrase, name, kek, tag) else None
    except Exception:  # the cache only saves time
        return None


def store(directory: str, passphrase: str, salt: bytes, n: int, r: int, p: int, kek: bytes) -> None:
    """Cache ``kek`` (best effort: a directory that cannot be made private is left alone)."""
    try:
        name = entry_name(passphrase, salt, n, r, p)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        dfd = _open_dir(directory)
        if dfd is None:
            return
        tmp = f".{name}.{os.urandom(8).hex()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                data = kek + _tag(passphrase, name, kek)
                written = os.write(fd, data)
            finally:
                os.close(fd)
            if written == len(data):
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            try:
                os.unlink(tmp, dir_fd=dfd)  # left only when the replace did not happen
            except OSError:
                pass
            os.close(dfd)
    except Exception:  # the cache only saves time
        pass
