"""pipeline/direct_io: restored files written with O_DIRECT, and the fall-backs to the page cache."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from saveit_backup.pipeline import direct_io
from saveit_backup.pipeline.compress import ChunkReader
from saveit_backup.pipeline.direct_io import DirectFiles

BUF = 64 << 10


@pytest.fixture(autouse=True)
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_io, "BUFFER_SIZE", BUF)


def _open(files: DirectFiles, path: Path) -> int:
    fd = files.open(str(path))
    if fd is None:
        pytest.skip(f"the file system of {path} refuses O_DIRECT")
    return fd


def _write(files: DirectFiles, path: Path, chunks: list[Any]) -> tuple[int, bytes]:
    """Write ``chunks``; returns the size and the bytes ``update`` saw."""
    seen = bytearray()
    fd = _open(files, path)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        size = files.write(fd, ChunkReader(chunks).readinto, seen.extend)
    finally:
        os.close(fd)
    return size, bytes(seen)


def _pieces(data: bytes, sizes: list[int]) -> list[Any]:
    out: list[Any] = []
    at = 0
    for i, n in enumerate(sizes):
        piece = data[at : at + n]
        out.append(memoryview(piece) if i % 2 else piece)
        at += n
    return out


@pytest.mark.parametrize("sizes", [
    [],  # an empty file
    [1],  # one byte: a padded block, cut back
    [4095], [4096], [4097],
    [BUF], [BUF + 1], [BUF - 1, 1],  # a full buffer, one byte over, filled by two chunks
    [3 * BUF],  # one chunk spanning three buffers
    [7, BUF - 3, 4096 * 3 + 5, BUF * 2, 11],  # chunks across buffer boundaries, odd tail
])
def test_writes_exact_bytes(tmp_path: Path, sizes: list[int]) -> None:
    data = random.Random(len(sizes)).randbytes(sum(sizes))
    files = DirectFiles()
    try:
        size, seen = _write(files, tmp_path / "f", _pieces(data, sizes))
    finally:
        files.close()
    assert size == len(data) and seen == data
    assert (tmp_path / "f").read_bytes() == data
    assert files.supported


def test_one_writer_serves_several_threads_and_files(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    blobs = [random.Random(i).randbytes(BUF * 2 + 100 * i) for i in range(6)]
    files = DirectFiles()
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda i: _write(files, tmp_path / str(i), [blobs[i]]), range(6)))
    finally:
        files.close()
    assert [(tmp_path / str(i)).read_bytes() == blobs[i] for i in range(6)] == [True] * 6


def test_refused_at_open_falls_back_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        calls.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    files = DirectFiles()
    assert files.open(str(tmp_path / "a")) is None and not files.supported
    assert files.open(str(tmp_path / "b")) is None
    assert len(calls) == 1  # not tried again


def _refuse_direct_writes(monkeypatch: pytest.MonkeyPatch, refuse: Callable[[int], bool]) -> None:
    """``os.pwrite`` refusing (EINVAL) a direct write at an offset for which ``refuse`` says so; others pass."""
    real_write = os.pwrite

    def refusing(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and refuse(offset):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", refusing)


def test_refused_write_goes_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_direct_writes(monkeypatch, lambda offset: True)
    data = random.Random(1).randbytes(BUF * 2 + 10)
    files = DirectFiles()
    try:
        fd = _open(files, tmp_path / "f")
        try:
            assert files.write(fd, ChunkReader([data]).readinto, lambda c: None) == len(data)
            assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        finally:
            os.close(fd)
    finally:
        files.close()
    assert (tmp_path / "f").read_bytes() == data and not files.supported


def test_errors_reach_the_caller_after_the_helper_is_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_source() -> Iterator[bytes]:
        yield bytes(BUF)  # a full buffer: handed to the helper thread
        raise ValueError("corrupt object")

    files = DirectFiles()
    finished: list[int] = []
    real_write_all = files._write_all

    def slow_write_all(fd: int, view: memoryview, offset: int) -> None:
        time.sleep(0.3)
        real_write_all(fd, view, offset)
        finished.append(len(view))

    files._write_all = slow_write_all  # type: ignore[method-assign]
    try:
        fd = _open(files, tmp_path / "f")
        try:
            with pytest.raises(ValueError, match="corrupt object"):
                files.write(fd, ChunkReader(failing_source()).readinto, lambda c: None)
            assert finished == [BUF]  # the helper was done before the caller could close its descriptor
        finally:
            os.close(fd)

        def full(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        files._write_all = real_write_all  # type: ignore[method-assign]
        monkeypatch.setattr(direct_io.os, "pwrite", full)
        fd = _open(files, tmp_path / "g")
        try:
            with pytest.raises(OSError, match="No space left"):
                files.write(fd, ChunkReader([bytes(BUF * 3)]).readinto, lambda c: None)
        finally:
            os.close(fd)
    finally:
        files.close()
    assert files.supported  # ENOSPC is no reason to stop writing directly


def test_up_to_in_flight_writes_at_once_each_at_its_offset(tmp_path: Path) -> None:
    """While one buffer fills, IN_FLIGHT others are written concurrently (pwrite at their own offsets)."""
    import threading

    files = DirectFiles()
    real_write_all = files._write_all
    lock = threading.Lock()
    now = peak = 0

    def counting(fd: int, view: memoryview, offset: int) -> None:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.05)
        real_write_all(fd, view, offset)
        with lock:
            now -= 1

    files._write_all = counting  # type: ignore[method-assign]
    data = random.Random(9).randbytes(BUF * 6 + 123)
    try:
        size, _ = _write(files, tmp_path / "f", [data])
    finally:
        files.close()
    assert size == len(data) and (tmp_path / "f").read_bytes() == data
    assert peak == direct_io.IN_FLIGHT


def test_an_error_after_the_loop_waits_for_the_other_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two full buffers in flight when the source ends: the first write's error is raised only once the
    second write has ended too (the caller closes the descriptor right after)."""
    import threading

    files = DirectFiles()
    real_write_all = files._write_all
    ended: list[int] = []

    def first_fails_second_slow(fd: int, view: memoryview, offset: int) -> None:
        if offset == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.3)
        real_write_all(fd, view, offset)
        ended.append(offset)

    files._write_all = first_fails_second_slow  # type: ignore[method-assign]
    try:
        fd = _open(files, tmp_path / "f")
        try:
            with pytest.raises(OSError, match="No space"):
                files.write(fd, ChunkReader([bytes(2 * BUF)]).readinto, lambda c: None)
            assert ended == [BUF]
        finally:
            os.close(fd)
    finally:
        files.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("direct-io")]


def test_both_writes_in_flight_refused_at_once_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device refusing direct writes refuses both in-flight ones; the helper that finds O_DIRECT already
    cleared by the other retries through the cache instead of failing the restore."""
    import threading

    both = threading.Barrier(2, timeout=5)
    refused: list[int] = []

    def together(offset: int) -> bool:
        if len(refused) >= 2:
            return False
        refused.append(offset)
        both.wait()  # both writes were issued with O_DIRECT set
        return True

    _refuse_direct_writes(monkeypatch, together)
    data = random.Random(4).randbytes(BUF * 3 + 77)
    files = DirectFiles()
    try:
        size, _ = _write(files, tmp_path / "f", [data])
    finally:
        files.close()
    assert sorted(refused) == [0, BUF] and size == len(data)
    assert (tmp_path / "f").read_bytes() == data and not files.supported
