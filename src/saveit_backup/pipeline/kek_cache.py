"""Host-side cache of passphrase-derived key-encryption keys (KEKs) between processes.

Every ``wal-push`` (``archive_command``) and ``wal-fetch`` (``restore_command``) is a new process,
and scrypt at the repository's parameters (n = 2^15, r = 8) costs 70-130 ms and 32 MiB here: more
than the rest of a push.  The first process stores the KEK it derived; the next ones read it.

* Where: ``BACKUP_KEY_CACHE_DIR``; by default ``/dev/shm/saveit-backup-<uid>`` (memory only, gone
  at reboot); ``off`` disables the cache.
* One file per (passphrase, salt, scrypt parameters), named by HMAC-SHA256(passphrase, salt and
  parameters), holding the 32-byte KEK: another passphrase uses another file.
* A cached KEK is used only from a directory that is not a symlink and a regular file, both owned by
  this process's user and closed to group and others; anything else is ignored and the KEK derived.
  The cache only saves time: none of its failures is an error.

Exposure: the file opens what the passphrase opens (passphrase slots), and is readable only by
the user who already reads the passphrase (its configuration file or environment).
"""

from __future__ import annotations

import os
import stat

KEK_SIZE = 32
DISABLED = frozenset({"off", "none", "false", "no", "0"})
_NAME_CONTEXT = b"saveit-backup kek cache v1"


def resolve(setting: str) -> str | None:
    """The cache directory for a ``key_cache_dir`` setting: empty means the default, ``off`` none."""
    value = setting.strip()
    if value.lower() in DISABLED:
        return None
    if value:
        return value
    return f"/dev/shm/saveit-backup-{os.geteuid()}" if os.path.isdir("/dev/shm") else None


def entry_name(passphrase: str, salt: bytes, n: int, r: int, p: int) -> str:
    # cryptography's HMAC: its library is loaded for AES-GCM anyway; hashlib would load OpenSSL again (3 ms)
    from cryptography.hazmat.primitives import hashes, hmac

    mac = hmac.HMAC(passphrase.encode(), hashes.SHA256())
    mac.update(b"|".join([_NAME_CONTEXT, salt.hex().encode(), b"%d|%d|%d" % (n, r, p)]))
    return mac.finalize().hex()


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _private_dir(directory: str) -> bool:
    st = os.lstat(directory)
    return stat.S_ISDIR(st.st_mode) and _private(st)


def load(directory: str, passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes | None:
    """The cached KEK, or None (missing, or not trusted: see the module contract)."""
    try:
        if not _private_dir(directory):
            return None
        fd = os.open(os.path.join(directory, entry_name(passphrase, salt, n, r, p)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and _private(st) and st.st_size == KEK_SIZE):
            return None
        data = os.read(fd, KEK_SIZE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == KEK_SIZE else None


def store(directory: str, passphrase: str, salt: bytes, n: int, r: int, p: int, kek: bytes) -> None:
    """Cache ``kek`` (best effort: a directory that cannot be made private is left alone)."""
    name = entry_name(passphrase, salt, n, r, p)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}")
    try:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        if not _private_dir(directory):
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, kek)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(directory, name))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
