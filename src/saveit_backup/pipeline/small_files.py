"""Small files of a restore written by one helper thread, beside the decompression.

Why: creating a file costs more than writing its bytes here (0.4-0.8 ms a file: ext4 searching past
recently deleted inodes), and creations in one directory wait for each other (the directory's lock),
so more helpers do not help.  One helper creating files while the restoring threads decompress and
write the big files overlaps the two; done inline, they add up.

Contract of ``SmallFiles``:
* ``submit(path, data, mode, mtime, label)`` queues a new file: created with ``O_NOFOLLOW`` (and
  ``O_EXCL`` when ``exclusive``), ``data`` written, ``mode`` set, times set to ``mtime`` when given.
  Files are written in the order submitted.  ``submit`` waits while more than ``budget`` bytes are
  queued (one file is always accepted), and raises the first failure of the helper, if any.
* After a failure nothing more is written.  ``check()`` raises it (through ``translate``, given the
  failed file's ``label``, when set).
* ``close()`` waits until the helper has finished: nothing is written after it returns.  Call
  ``check()`` after it to learn about a failure of the last files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

BUDGET = 32 << 20

Data = bytes | bytearray | memoryview


class SmallFiles:
    def __init__(self, budget: int = BUDGET, exclusive: bool = False,
                 translate: Callable[[str, BaseException], BaseException] | None = None) -> None:
        self.budget = budget
        self.exclusive = exclusive
        self.translate = translate
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="small-files")
        self.cond = threading.Condition()
        self.waiting = 0  # bytes queued, not yet written
        self.failed: tuple[str, BaseException] | None = None

    def submit(self, path: str, data: Data, mode: int = 0o600, mtime: float | None = None, label: str = "") -> None:
        size = len(data)
        with self.cond:
            while self.waiting and self.waiting + size > self.budget and self.failed is None:
                self.cond.wait()
            self.check()
            self.waiting += size
        try:
            self.pool.submit(self._write, path, data, mode, mtime, label or path)
        except BaseException:
            with self.cond:
                self.waiting -= size
                self.cond.notify_all()
            raise

    def room_for(self, size: int) -> bool:
        """Whether ``submit`` of ``size`` bytes would be accepted without waiting now."""
        with self.cond:
            return not self.waiting or self.waiting + size <= self.budget

    def _write(self, path: str, data: Data, mode: int, mtime: float | None, label: str) -> None:
        try:
            if self.failed is None:
                write_file(path, data, mode, mtime, self.exclusive)
        except BaseException as exc:  # reported to the submitting threads by check()
            with self.cond:
                self.failed = self.failed or (label, exc)
        finally:
            with self.cond:
                self.waiting -= len(data)
                self.cond.notify_all()

    def check(self) -> None:
        """Raise the helper's first failure.  A caller that fails itself meanwhile may never see it: its own error is the one reported."""
        if self.failed is None:
            return
        label, exc = self.failed
        raise (self.translate(label, exc) if self.translate else exc)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def create(path: str, exclusive: bool = True) -> int:
    """A new file for writing, mode 0600; never through a symbolic link at ``path``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
    return os.open(path, flags, 0o600)


def write_all(fd: int, data: Data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_file(path: str, data: Data, mode: int = 0o600, mtime: float | None = None, exclusive: bool = True) -> None:
    fd = create(path, exclusive)
    try:
        write_all(fd, data)
        os.fchmod(fd, mode)  # whatever the umask
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)
