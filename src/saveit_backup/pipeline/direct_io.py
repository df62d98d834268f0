"""Write restored files with O_DIRECT: from two reused buffers to the disk, around the page cache.

Why: through the page cache, every restored byte is copied into newly allocated cache pages, and in a
virtual machine that hands freed memory back to its host, touching new pages costs the most CPU of a
restore (2 to 4 s of system time for 1.8 GB here, varying with the host).  Direct writes leave the
cache alone, and no dirty data is left when the restore ends (pgBackRest fsyncs every file; metadata
and the device's cache are synced by PostgreSQL's start-up sync of the data directory, as before).

Contract of ``DirectFiles``:
* ``open(path, exclusive)`` creates (or truncates) ``path`` for direct writes, mode 0600; with
  ``exclusive``, only a new file, never through a symbolic link (O_EXCL).  ``None`` where the file
  system refuses O_DIRECT (the caller writes through the cache then, and so do later calls).
* ``write(fd, readinto, update)`` fills buffers with ``readinto`` (a raw file's: 0 at the end; a zstd
  reader decompresses straight into them), passes each filled piece to ``update`` (the digest), writes
  it, and returns the byte count.  Each calling thread owns ``IN_FLIGHT + 1`` page-aligned buffers
  of ``BUFFER_SIZE``: one fills while helper threads write up to ``IN_FLIGHT`` others at their
  offsets, so decompressing and writing overlap and the disk sees more than one write at a time (two
  direct writers took 1.55 s for 1.8 GB here where one took 1.70-2.11 s).  The last, partial block
  is written padded with zeros, then the file is cut to its size.  A write the device refuses as
  misaligned (EINVAL) is retried through the cache: O_DIRECT is cleared on that descriptor and not
  used again.
* ``close()`` ends the helper threads; the buffers go with their threads' data.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # threads load only for DirectFiles: write_at and write_tail serve wal-push's storage too
    from concurrent.futures import Future

BUFFER_SIZE = 4 << 20
IN_FLIGHT = 2  # direct writes of one calling thread at once
ALIGN = 4096  # covers devices of 512- and 4096-byte logical blocks; buffers are page-aligned (mmap)


class _Buffers:
    """One thread's buffers and the helper threads that write them."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.views = [memoryview(mmap.mmap(-1, BUFFER_SIZE)) for _ in range(IN_FLIGHT + 1)]
        self.io = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="direct-io")


class DirectFiles:
    def __init__(self) -> None:
        import threading

        self.supported = hasattr(os, "O_DIRECT")
        self._local = threading.local()
        self._all: list[_Buffers] = []
        self._lock = threading.Lock()

    def open(self, path: str, exclusive: bool = False) -> int | None:
        if not self.supported:
            return None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT | (os.O_EXCL | os.O_NOFOLLOW if exclusive else 0)
        try:
            return os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.supported = False
            return None

    def write(self, fd: int, readinto: Callable[[memoryview], int], update: Callable[[memoryview], object]) -> int:
        bufs = self._buffers()
        busy: list[Future[None] | None] = [None] * len(bufs.views)  # the write of each buffer, if any
        cur, fill, size = 0, 0, 0
        try:
            while n := readinto(bufs.views[cur][fill:]):
                update(bufs.views[cur][fill : fill + n])
                fill += n
                size += n
                if fill == BUFFER_SIZE:
                    busy[cur] = bufs.io.submit(self._write_all, fd, bufs.views[cur], size - fill)
                    cur, fill = (cur + 1) % len(busy), 0
                    if (pending := busy[cur]) is not None:  # the buffer to fill next: its write must be done
                        busy[cur] = None
                        pending.result()
        except BaseException:  # the helpers never write to a descriptor the caller closes (and the system reuses)
            for f in busy:
                if f is not None:
                    f.exception()  # waits; the caller's error is raised, the helpers' (if any) dropped
            raise
        errors = [f.exception() for f in busy if f is not None]  # every write ended before one's error is raised
        if failed := next((e for e in errors if e is not None), None):
            raise failed
        if fill and not write_tail(fd, bufs.views[cur], fill, size - fill):
            self.supported = False
        return size

    def close(self) -> None:
        with self._lock:
            for bufs in self._all:
                bufs.io.shutdown()
            self._all.clear()

    def _buffers(self) -> _Buffers:
        bufs: _Buffers | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = _Buffers()
            with self._lock:
                self._all.append(bufs)
        return bufs

    def _write_all(self, fd: int, view: memoryview, offset: int) -> None:
        if not write_at(fd, view, offset):
            self.supported = False


def write_at(fd: int, view: memoryview, offset: int) -> bool:
    """All of ``view`` at ``offset`` of ``fd``; False if a write was refused as misaligned (EINVAL): O_DIRECT
    is then cleared on ``fd`` and the rest goes through the cache (once more when another thread had
    cleared it while this write was already refused; a refusal after that is raised)."""
    direct = True
    cached = False
    while view:
        try:
            done = os.pwrite(fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or cached:
                raise
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if flags & os.O_DIRECT:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            else:
                cached = True
            direct = False
            continue
        view, offset = view[done:], offset + done
    return direct


def write_tail(fd: int, buf: memoryview, fill: int, offset: int) -> bool:
    """A file's last ``fill`` bytes, at the start of the aligned ``buf``, written at ``offset`` padded with
    zeros to ``ALIGN``; the file is then cut to ``offset + fill``.  Returns ``write_at``'s answer."""
    padded = -(-fill // ALIGN) * ALIGN
    buf[fill:padded] = bytes(padded - fill)
    direct = write_at(fd, buf[:padded], offset)
    if padded != fill:
        os.ftruncate(fd, offset + fill)
    return direct
