"""In-memory backend for unit tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from saveit_backup.errors import AlreadyExists, NotFound
from saveit_backup.storage.base import CHUNK_SIZE, Capabilities, Data, ObjectInfo, check_key, iter_chunks


class MemoryStorage:
    def __init__(self) -> None:
        self.capabilities = Capabilities(atomic_if_absent=True, url="memory://")
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        check_key(key)
        body = b"".join(iter_chunks(data))
        with self._lock:
            if if_absent and key in self._objects:
                raise AlreadyExists(f"object {key} already exists")
            self._objects[key] = (body, time.time())

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise NotFound(f"object {key} not found")
        body = found[0]
        end = len(body) if length is None else min(len(body), offset + length)
        return (body[i : min(i + CHUNK_SIZE, end)] for i in range(offset, end, CHUNK_SIZE))

    def stat(self, key: str) -> ObjectInfo:
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise NotFound(f"object {key} not found")
        return ObjectInfo(key, len(found[0]), found[1])

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]:
        with self._lock:
            items = sorted((k, v) for k, v in self._objects.items() if k.startswith(prefix))
        return iter([ObjectInfo(k, len(v[0]), v[1]) for k, v in items])

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)
