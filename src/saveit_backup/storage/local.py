"""Local filesystem backend: temp file, fsync, rename; files 0600, dirs 0700."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.capabilities = Capabilities(atomic_if_absent=True, url=f"file://{self.root}")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        final = self._path(key)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if if_absent and final.exists():
                raise AlreadyExists(f"object {key} already exists")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=True) as out:
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
                tmp.unlink(missing_ok=True)
                raise
            self._fsync_dir(final.parent)
        except OSError as exc:
            raise classify_os_error(exc, f"writing {key} in {self.root}") from exc

    @staticmethod
    def _fsync_dir(path: Path) -> None:
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
    def _read(handle: object, offset: int, length: int | None) -> Iterator[bytes]:
        import io

        assert isinstance(handle, io.BufferedReader)
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
            st = self._path(key).stat()
        except OSError as exc:
            raise classify_os_error(exc, f"stat {key} in {self.root}") from exc
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]:
        # Walk only the directory that can contain the prefix.
        base_dir = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base_dir.is_dir():
            return iter(())
        found: list[ObjectInfo] = []
        try:
            for dirpath, _dirs, files in os.walk(base_dir):
                for name in files:
                    if name.endswith(_TMP_SUFFIX) and not hidden:
                        continue
                    full = Path(dirpath) / name
                    key = full.relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        st = full.stat()
                        found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        except OSError as exc:
            raise classify_os_error(exc, f"listing {prefix} in {self.root}") from exc
        found.sort(key=lambda info: info.key)
        return iter(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise classify_os_error(exc, f"deleting {key} in {self.root}") from exc
        # Prune empty parent directories up to the root.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
