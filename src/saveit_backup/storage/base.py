"""The storage contract every backend implements.

Five operations on flat keys ("a/b/c", no leading slash):

* ``put(key, data, if_absent=False)``: store ``data`` (bytes, or an iterable of
  byte chunks streamed with bounded memory).  The object becomes visible
  atomically and completely or not at all.  With ``if_absent=True`` an existing
  key raises ``AlreadyExists`` and is left untouched (write-once).
* ``open(key, offset=0, length=None)``: iterate the bytes of an object (or a
  range of it) in chunks.  Missing key raises ``NotFound``.
* ``stat(key)``: ``ObjectInfo`` or ``NotFound``.
* ``list(prefix, hidden=False)``: every object whose key starts with ``prefix``, in
  key order.  ``hidden=True`` also lists the temporaries of writes in progress (or
  of crashed writers: names ending ``.tmp-saveit``), so cleanup can delete them.
* ``delete(key)``: remove; deleting a missing key is not an error.

Backends only classify errors into the ``errors`` storage tree (NotFound,
AlreadyExists, AccessDenied, NoSpace, TransientStorageError,
PermanentStorageError).  Retries, limits and fault injection are wrappers.
Streamed puts are not replayable: retrying them is the backend's business
(per multipart part); wrappers retry only ``bytes`` puts and reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

CHUNK_SIZE = 1 << 20
TMP_SUFFIX = ".tmp-saveit"  # temporaries of writes in progress; invisible unless listed with hidden=True

Data = bytes | Iterable[bytes]


class ObjectInfo(NamedTuple):
    key: str
    size: int
    mtime: float | None = None


class Capabilities(NamedTuple):
    """What a backend can promise beyond the contract."""

    atomic_if_absent: bool = True  # if_absent is enforced by the server, not check-then-write
    url: str = ""


@runtime_checkable
class Storage(Protocol):
    capabilities: Capabilities

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None: ...

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


def iter_chunks(data: Data) -> Iterator[bytes]:
    """Normalise ``Data`` to an iterator of non-empty chunks."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for start in range(0, len(view), CHUNK_SIZE):
            yield bytes(view[start : start + CHUNK_SIZE])
        return
    for chunk in data:
        if chunk:
            yield bytes(chunk)


def read_all(storage: Storage, key: str) -> bytes:
    return b"".join(storage.open(key))


def check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/") or key.endswith("/"):
        from saveit_backup.errors import ConfigError

        raise ConfigError(f"invalid storage key {key!r}")
    return key
