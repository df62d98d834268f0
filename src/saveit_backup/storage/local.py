"""Local filesystem backend: temp file, fsync, rename; files 0600, dirs 0700."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import BinaryIO

from saveit_backup.errors import (
    AccessDenied,
    AlreadyExists,
    NoSpace,
    NotFound,
    PermanentStorageError,
    StorageError,
)
from saveit_backup.storage.base import CHUNK_SIZE, TMP_SUFFIX, Capabilities, Data, ObjectInfo, check_key, iter_chunks

_TMP_SUFFIX = TMP_SUFFIX


def classify_os_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOENT:
        return NotFound(f"{what}: not found")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AccessDenied(f"{what}: permission denied")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: no space left on device")
    if exc.errno == errno.EEXIST:
        return AlreadyExists(f"{what}: already exists")
    return PermanentStorageError(f"{what}: {exc.strerror or exc}")


class LocalStorage:
    """Objects are files under ``root`` (a str path); keys map to relative paths."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.capabilities = Capabilities(atomic_if_absent=True, url=f"file://{self.root}")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        final = self._path(key)
        parent, name = os.path.split(final)
        tmp = os.path.join(parent, f".{name}.{os.urandom(12).hex()}{_TMP_SUFFIX}")
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            if if_absent and os.path.exists(final):
                raise AlreadyExists(f"object {key} already exists")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=True) as out:
                    if isinstance(data, (bytes, bytearray, memoryview)):
                        out.write(data)  # bigger than the buffer: written as it is, no copy in chunks
                    else:
                        for chunk in iter_chunks(data):
                            out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if if_absent:
                    os.link(tmp, final)  # fails atomically if final exists
                    os.unlink(tmp)
                else:
                    os.replace(tmp, final)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            self._fsync_dir(parent)
        except OSError as exc:
            raise classify_os_error(exc, f"writing {key} in {self.root}") from exc

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except OSError as exc:
            raise classify_os_error(exc, f"reading {key} in {self.root}") from exc
        return self._read(handle, offset, length)

    @staticmethod
    def _read(handle: BinaryIO, offset: int, length: int | None) -> Iterator[bytes]:
        with handle:
            if offset:
                handle.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                want = CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining)
                chunk = handle.read(want)
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except OSError as exc:
            raise classify_os_error(exc, f"stat {key} in {self.root}") from exc
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]:
        # Walk only the directory that can contain the prefix.
        base_dir = os.path.join(self.root, prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not os.path.isdir(base_dir):
            return iter(())
        found: list[ObjectInfo] = []
        cut = len(self.root) + 1
        try:
            for dirpath, _dirs, files in os.walk(base_dir):
                for name in files:
                    if name.endswith(_TMP_SUFFIX) and not hidden:
                        continue
                    full = os.path.join(dirpath, name)
                    key = full[cut:].replace(os.sep, "/")
                    if key.startswith(prefix):
                        st = os.stat(full)
                        found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        except OSError as exc:
            raise classify_os_error(exc, f"listing {prefix} in {self.root}") from exc
        found.sort(key=lambda info: info.key)
        return iter(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            _unlink_quietly(path)
        except OSError as exc:
            raise classify_os_error(exc, f"deleting {key} in {self.root}") from exc
        # Prune empty parent directories up to the root.
        parent = os.path.dirname(path)
        while parent != self.root and parent.startswith(self.root + os.sep):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)


def _unlink_quietly(path: str) -> None:
    """unlink; a missing file is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
