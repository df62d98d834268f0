"""Cross-cutting storage concerns as wrappers around any ``Storage``.

Compose them in one place, outermost first, e.g.
``RetryingStorage(LimitedStorage(backend, 8))``.  Every wrapper exposes the
inner ``capabilities`` unchanged and keeps the ``Storage`` contract.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from saveit_backup.errors import AlreadyExists, TransientStorageError
from saveit_backup.storage.base import Data, ObjectInfo, Storage, iter_chunks, read_all

if TYPE_CHECKING:
    import logging


def _log() -> logging.Logger:
    import logging  # only when retrying: wal-push's cold start does not pay for it

    return logging.getLogger(__name__)


T = TypeVar("T")

_BYTES_TYPES = (bytes, bytearray, memoryview)


# --- retry -----------------------------------------------------------------------


class RetryingStorage:
    """Retry ``TransientStorageError`` with exponential backoff and jitter.

    * ``stat``, ``list``, ``delete``: the whole call, up to ``attempts`` times.
    * ``open``: obtaining the iterator is retried; a transient failure while
      reading resumes at the byte offset reached (the failure budget resets
      whenever bytes arrive).  Assumes the object does not change meanwhile.
    * ``put``: retried only when ``data`` is bytes (streams are not replayable;
      the backend retries parts).  With ``if_absent``, an ``AlreadyExists`` after
      a failed attempt is success when the stored content equals ``data`` (the
      failed attempt did land).
    Other errors propagate at once.
    """

    def __init__(
        self,
        inner: Storage,
        attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self.capabilities = inner.capabilities
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    def _delay(self, failures: int) -> float:
        """Equal jitter: half the exponential step fixed, half random."""
        step = min(self.max_delay, self.base_delay * 2.0 ** (failures - 1))
        import random

        return step / 2 + random.uniform(0, step / 2)

    def _call(self, what: str, func: Callable[[], T]) -> T:
        failures = 0
        while True:
            try:
                return func()
            except TransientStorageError as exc:
                failures += 1
                if failures >= self.attempts:
                    raise
                delay = self._delay(failures)
                _log().debug("%s failed (%s); retry %d/%d in %.2fs", what, exc.message, failures, self.attempts - 1, delay)
                self._sleep(delay)

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        if not isinstance(data, _BYTES_TYPES):
            self.inner.put(key, data, if_absent=if_absent)
            return
        body = bytes(data)
        failed_before = False

        def attempt() -> None:
            nonlocal failed_before
            try:
                self.inner.put(key, body, if_absent=if_absent)
            except TransientStorageError:
                failed_before = True
                raise
            except AlreadyExists:
                if failed_before and if_absent and read_all(self.inner, key) == body:
                    return  # our earlier attempt was stored before its reply was lost
                raise

        self._call(f"put {key}", attempt)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        first = self._call(f"open {key}", lambda: self.inner.open(key, offset, length))
        return self._resuming(key, first, offset, length)

    def _resuming(self, key: str, stream: Iterator[bytes], offset: int, length: int | None) -> Iterator[bytes]:
        done = 0
        failures = 0
        while True:
            try:
                for chunk in stream:
                    if chunk:
                        done += len(chunk)
                        failures = 0
                        yield chunk
                return
            except TransientStorageError as exc:
                failures += 1
                if failures >= self.attempts:
                    raise
                delay = self._delay(failures)
                _log().debug(
                    "reading %s failed at byte %d (%s); resuming in %.2fs", key, offset + done, exc.message, delay
                )
                self._sleep(delay)
                remaining = None if length is None else length - done
                if remaining == 0:
                    return
                stream = self._call(f"open {key}", functools.partial(self.inner.open, key, offset + done, remaining))

    def stat(self, key: str) -> ObjectInfo:
        return self._call(f"stat {key}", lambda: self.inner.stat(key))

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]:
        # Materialised so a failure half-way through can be retried as a whole.
        return iter(self._call(f"list {prefix}", lambda: list(self.inner.list(prefix, hidden=hidden))))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))


# --- concurrency limit -----------------------------------------------------------


class _PermitIterator(Iterator[bytes]):
    """Holds one permit until exhausted, failed, closed or garbage-collected."""

    def __init__(self, inner: Iterator[bytes], release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def _done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __next__(self) -> bytes:
        if self._release is None:
            raise StopIteration
        try:
            return next(self._inner)
        except BaseException:
            self._done()
            raise

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self._done()

    def __del__(self) -> None:
        self._done()


class LimitedStorage:
    """At most ``max_concurrency`` operations in flight.

    A stream from ``open`` holds its permit until it is exhausted, fails or is
    closed (like object_store's LimitStore): a caller that keeps more streams
    open than the limit in one thread blocks itself.
    """

    def __init__(self, inner: Storage, max_concurrency: int) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.inner = inner
        self.capabilities = inner.capabilities
        self.max_concurrency = max_concurrency
        import threading  # here: a sync wal-push, the one caller without this wrapper, never loads it

        self._sem = threading.BoundedSemaphore(max_concurrency)

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        with self._sem:
            self.inner.put(key, data, if_absent=if_absent)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        self._sem.acquire()
        try:
            stream = self.inner.open(key, offset, length)
        except BaseException:
            self._sem.release()
            raise
        return _PermitIterator(iter(stream), self._sem.release)

    def stat(self, key: str) -> ObjectInfo:
        with self._sem:
            return self.inner.stat(key)

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]:
        with self._sem:
            return iter(list(self.inner.list(prefix, hidden=hidden)))

    def delete(self, key: str) -> None:
        with self._sem:
            self.inner.delete(key)


# --- fault injection (tests) -----------------------------------------------------


class InjectedCrash(Exception):
    """Raised by ``FaultyStorage`` from inside a streamed put to simulate a crash."""


OPERATIONS = ("put", "open", "stat", "list", "delete")
ErrorFactory = Callable[[], BaseException]


def _flip_first_byte(chunk: bytes) -> bytes:
    return bytes([chunk[0] ^ 0xFF]) + chunk[1:] if chunk else chunk


class FaultyStorage:
    """Programmable faults for tests; passes everything else through.

    * ``fail_next(op, count, error)``: the next ``count`` calls of ``op`` raise
      (default ``TransientStorageError``) without reaching the inner storage.
    * ``fail_reads_after(nbytes, count, error)``: the next ``count`` streams from
      ``open`` raise after yielding ``nbytes`` bytes.
    * ``corrupt_reads(predicate, corrupt)``: streams of keys matching
      ``predicate`` have each chunk passed through ``corrupt`` (default: the
      first byte of the first chunk is inverted).
    * ``crash_put_after(nbytes, count, error)``: the next ``count`` puts feed the
      inner storage ``nbytes`` bytes and then raise (default ``InjectedCrash``)
      from inside the data stream, like a producer dying mid-upload.
    ``calls`` counts every call per operation, faulted or not.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.calls: Counter[str] = Counter()
        import threading

        self._lock = threading.Lock()
        self._fail: dict[str, list[ErrorFactory]] = {op: [] for op in OPERATIONS}
        self._read_faults: list[tuple[int, ErrorFactory]] = []
        self._put_crashes: list[tuple[int, ErrorFactory]] = []
        self._corrupt: list[tuple[Callable[[str], bool], Callable[[bytes], bytes] | None]] = []

    # programming
    def fail_next(self, op: str, count: int = 1, error: ErrorFactory | None = None) -> None:
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")
        factory = error or (lambda: TransientStorageError(f"injected {op} fault"))
        with self._lock:
            self._fail[op].extend([factory] * count)

    def fail_reads_after(self, nbytes: int, count: int = 1, error: ErrorFactory | None = None) -> None:
        factory = error or (lambda: TransientStorageError(f"injected read fault after {nbytes} bytes"))
        with self._lock:
            self._read_faults.extend([(nbytes, factory)] * count)

    def corrupt_reads(self, predicate: Callable[[str], bool], corrupt: Callable[[bytes], bytes] | None = None) -> None:
        with self._lock:
            self._corrupt.append((predicate, corrupt))

    def crash_put_after(self, nbytes: int, count: int = 1, error: ErrorFactory | None = None) -> None:
        factory = error or (lambda: InjectedCrash(f"injected crash after {nbytes} bytes"))
        with self._lock:
            self._put_crashes.extend([(nbytes, factory)] * count)

    def clear(self) -> None:
        with self._lock:
            for queue in self._fail.values():
                queue.clear()
            self._read_faults.clear()
            self._put_crashes.clear()
            self._corrupt.clear()

    # plumbing
    def _enter(self, op: str) -> None:
        with self._lock:
            self.calls[op] += 1
            factory = self._fail[op].pop(0) if self._fail[op] else None
        if factory is not None:
            raise factory()

    @staticmethod
    def _crashing(data: Data, nbytes: int, factory: ErrorFactory) -> Iterator[bytes]:
        sent = 0
        for chunk in iter_chunks(data):
            room = nbytes - sent
            if len(chunk) >= room:
                if room:
                    yield chunk[:room]
                raise factory()
            sent += len(chunk)
            yield chunk
        raise factory()  # the data was shorter than nbytes: crash at its end

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        self._enter("put")
        with self._lock:
            crash = self._put_crashes.pop(0) if self._put_crashes else None
        if crash is not None:
            data = self._crashing(data, *crash)
        self.inner.put(key, data, if_absent=if_absent)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        self._enter("open")
        stream = self.inner.open(key, offset, length)
        with self._lock:
            read_fault = self._read_faults.pop(0) if self._read_faults else None
            corrupters = [(c or _flip_first_byte) for p, c in self._corrupt if p(key)]
        if corrupters:
            stream = self._corrupting(stream, corrupters)
        if read_fault is not None:
            stream = self._failing(stream, *read_fault)
        return stream

    @staticmethod
    def _corrupting(stream: Iterable[bytes], corrupters: list[Callable[[bytes], bytes]]) -> Iterator[bytes]:
        first = True
        for chunk in stream:
            for corrupt in corrupters:
                if corrupt is _flip_first_byte and not first:
                    continue  # the default corrupts only the first byte of the stream
                chunk = corrupt(chunk)
            first = first and not chunk
            yield chunk

    @staticmethod
    def _failing(stream: Iterable[bytes], nbytes: int, factory: ErrorFactory) -> Iterator[bytes]:
        sent = 0
        for chunk in stream:
            room = nbytes - sent
            if len(chunk) >= room:
                if room:
                    yield chunk[:room]
                raise factory()
            sent += len(chunk)
            yield chunk
        # shorter than nbytes: the stream ends normally

    def stat(self, key: str) -> ObjectInfo:
        self._enter("stat")
        return self.inner.stat(key)

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]:
        self._enter("list")
        return self.inner.list(prefix, hidden=hidden)

    def delete(self, key: str) -> None:
        self._enter("delete")
        self.inner.delete(key)
