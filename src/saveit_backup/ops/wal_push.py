"""Push one WAL file into the repository (``archive_command``), idempotently.

Contract (docs/format.md, "WAL segments"):

* a segment's first page header must match its file name (timeline and page
  address), else ``IntegrityError``; ``.history``, ``.backup`` and ``.partial``
  files are stored without a header check;
* the file is stored through the pipeline (compressed, encrypted per the
  repository config) under ``layout.wal_key(name)``, write-once;
* if the key already exists, the stored object's plain digest (from its header,
  else by decoding it) is compared with the file's: equal is success (``PushResult.status == "exists"``), different is
  ``WalMismatch`` (exit 16).  An archived object is never overwritten.

This module is on the cold-start path of every ``archive_command``: it imports
only what pushing needs (no psycopg, no full CLI parser).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, NamedTuple

from saveit_backup.domain.wal import MIN_SEGMENT_SIZE, WalFileKind, check_segment_header, classify_archive_name
from saveit_backup.errors import AlreadyExists, ConfigError, IntegrityError, SaveitError, WalMismatch
from saveit_backup.repo import layout

if TYPE_CHECKING:
    from threading import Semaphore

    from saveit_backup.config import Settings
    from saveit_backup.pipeline.envelope import EncodeOptions
    from saveit_backup.repo.repository import Repository


READ_SIZE = 1 << 20
# Objects up to this size are encoded in memory and put as bytes, so the storage
# retry wrapper can replay them; bigger ones (segments of 128 MiB and more) stream.
BUFFERED_MAX = 64 << 20


class PushResult(NamedTuple):
    name: str
    key: str
    status: str  # "stored" | "exists"
    plain_size: int
    stored_size: int
    seconds: float


def open_repo(settings: Settings, serial: bool = False) -> Repository:
    """The repository for WAL commands; initialised on first push if missing.  ``serial``: see
    ``compose.build_storage``."""
    from saveit_backup.compose import Context

    repo = Context(settings, serial).repo
    repo.ensure(auto_init=True)
    return repo


def wal_name(name: str) -> WalFileKind:
    """Classify an archive file name; refuse anything that is not a WAL file."""
    kind = classify_archive_name(name, MIN_SEGMENT_SIZE).kind  # most permissive segment size
    if kind is WalFileKind.INVALID:
        raise ConfigError(f"{name!r} is not a WAL file name (segment, .partial, .history or .backup)",
                          hint="archive_command must pass %p, restore_command %f")
    return kind


def _chunks(fd: int) -> Iterator[bytes]:
    offset = 0
    while True:
        chunk = os.pread(fd, READ_SIZE, offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def _file_digest(fd: int, algorithm: str | None = None) -> str:
    """The file's digest (``algorithm``: this build's when None); only on a name clash or for the header."""
    from saveit_backup.pipeline import digests

    algorithm = algorithm or digests.WRITE_ALGORITHM
    h = digests.new(algorithm)
    for chunk in _chunks(fd):
        h.update(chunk)
    return digests.tagged(h, algorithm)


def _digest_of(data: memoryview) -> str:
    from saveit_backup.pipeline import digests

    return digests.of_bytes(data)


def check_file(path: str, name: str, fd: int) -> None:
    """Segments: the header must name this segment and the size must be the header's segment size."""
    header = os.pread(fd, 64, 0)
    try:
        hdr = check_segment_header(name, header)
    except ValueError as exc:
        raise IntegrityError(f"refusing to archive {path}: {exc}",
                             hint="the content belongs to another segment; never rename WAL files by hand") from None
    size = os.fstat(fd).st_size
    if size != hdr.seg_size:
        raise IntegrityError(f"refusing to archive {path}: {size} bytes, but its header says segments are {hdr.seg_size} bytes",
                             hint="the segment is truncated or still being written")


def push_file(repo: Repository, path: str, options: EncodeOptions | None = None, name: str | None = None,
              cpu: Semaphore | None = None, mapped: bool = True) -> PushResult:
    """Store the WAL file at ``path`` under its name (see the module contract).

    ``cpu``, from parallel pushers, is held while reading and compressing, not while storing:
    more compressions at once than cores only slow each other down.  ``mapped``: see ``_contents``."""
    from saveit_backup.pipeline.envelope import Digest, encode, encode_buffer

    started = time.monotonic()
    name = name or os.path.basename(path)
    kind = wal_name(name)
    key = layout.wal_key(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot read WAL file {path}: {exc.strerror}", hint="archive_command must pass %p") from None
    try:
        if kind is WalFileKind.SEGMENT:
            check_file(path, name, fd)
        # The digest is only needed on a name clash. PostgreSQL archives one file at a time, so the
        # configured zstd threads shorten each call (16 MiB at level 3: 16 ms single, 12 ms with 2);
        # parallel pushers (the async worker) pass ``worker_options`` instead.
        opts = (options or repo.write_options())._replace(hash=False)
        # A writer that cannot decrypt (public keys only) records the digest in the header to compare later.
        needs_digest = opts.encrypt and not repo.keyring.can_read
        digest = Digest()
        big = os.fstat(fd).st_size > BUFFERED_MAX
        stored: bytes | Iterator[bytes]
        if not big:  # bytes: the storage retry wrapper can replay them
            with cpu or nullcontext(), _contents(fd, mapped) as data:
                stored = encode_buffer(data, opts, repo.keyring, digest, plain_digest=_digest_of(data) if needs_digest else None)
        else:  # segments of 128 MiB and more stream, compressed while stored
            stored = encode(_chunks(fd), opts, repo.keyring, digest, plain_digest=_file_digest(fd) if needs_digest else None)
        try:
            with cpu if big and cpu else nullcontext():
                repo.storage.put(key, stored, if_absent=True)
        except AlreadyExists:
            _compare_existing(repo, key, name, fd, digest.plain_digest)
            return PushResult(name, key, "exists", os.fstat(fd).st_size, 0, time.monotonic() - started)
        return PushResult(name, key, "stored", digest.plain_size, digest.stored_size, time.monotonic() - started)
    finally:
        os.close(fd)


@contextmanager
def _contents(fd: int, mapped: bool) -> Iterator[memoryview]:
    """The whole file, for one zstd call (about 20% less CPU than streaming it, measured here).

    ``mapped`` (``archive_command`` and the async worker): the file is mapped, the cheapest read (no
    copy: reading 16 MiB into a kept buffer costs about 4 ms more CPU here, a fresh buffer about 10 ms
    of page faults).  A read error or a truncation while mapped ends the process with SIGBUS; nothing
    has been stored nor acknowledged then: PostgreSQL retries, a new worker starts, and the size check
    (``check_file``) reports a truncated segment.  wal-receive, which may run inside the long-lived
    service (one push at a time, off PostgreSQL's path), passes False: the file is read into a buffer
    kept for its next push."""
    size = os.fstat(fd).st_size
    if mapped and size > 0:
        import mmap

        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping, memoryview(mapping) as data:
            yield data
        return
    buf = _SPARE.pop() if _SPARE else bytearray()
    try:
        with _read_whole(fd, size, buf) as data:
            yield data
    finally:
        _SPARE.append(buf)


# Read buffers kept for the next push of this process (list.pop/append are atomic: one per thread in use).
_SPARE: list[bytearray] = []


def _read_whole(fd: int, size: int, buf: bytearray) -> memoryview:
    """The whole file read into ``buf`` (grown as needed) in one call; chunk by chunk if it changed size meanwhile."""
    if len(buf) <= size:
        buf.extend(bytes(size + 1 - len(buf)))
    if os.preadv(fd, [buf], 0) == size:  # asked for one byte more: nothing follows
        return memoryview(buf)[:size]
    return memoryview(b"".join(_chunks(fd)))


def _compare_existing(repo: Repository, key: str, name: str, fd: int, local: str) -> None:
    """Already archived: equal plain digests are success, anything else WalMismatch.  ``local``: the
    file's digest if known; it is computed with the stored digest's algorithm otherwise."""
    from saveit_backup.pipeline import digests
    from saveit_backup.pipeline.envelope import describe

    try:
        stored = digests.recorded(describe(repo.storage.open(key), key), required=False)  # written by hosts holding public keys only
        if not stored:
            h = digests.new()
            for chunk in repo.read_object(key):
                h.update(chunk)
            stored = digests.tagged(h)
        algorithm = digests.algorithm_of(stored)
    except SaveitError as exc:
        raise type(exc)(f"{name} is already archived but the stored copy could not be read to compare: {exc.message}",
                        exc.hint) from exc
    if not local.startswith(f"{algorithm}:"):
        local = _file_digest(fd, algorithm)
    if stored != local:
        raise WalMismatch(f"{name} is already archived with different content (stored {digests.short(stored)}, "
                          f"local {digests.short(local)}); the archived copy was kept")
    import logging

    logging.getLogger("saveit_backup.wal").info("%s was already archived with identical content", name)


def worker_options(repo: Repository) -> EncodeOptions:
    """Options for pushing several segments in parallel: one compression thread each."""
    return repo.write_options()._replace(threads=0)
