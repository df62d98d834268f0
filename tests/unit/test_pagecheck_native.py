"""The C page checker (``saveit_backup.pg._pagecheck``) against the numpy code and the word-by-word reference."""

from __future__ import annotations

import importlib
import os
import random
import shutil
import struct
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable
from typing import Any

import pytest

from saveit_backup.pg import pagecheck as pc
from tests.unit.test_pagecheck import REAL_CHECKSUM, REAL_PAGE, _page, _sign

Data = bytes | bytearray | memoryview
CheckChunk = Callable[[Data, int, int], tuple[int, list[pc.BadPage]]]
MAX_LSN = 0x2_0000_0000


def _native_module() -> Any:
    """The extension, imported directly (even under SAVEIT_PAGECHECK=numpy); None if it was not built."""
    try:
        return importlib.import_module("saveit_backup.pg._pagecheck")
    except ImportError:
        return None


NATIVE = _native_module()


def _native_check_chunk(data: Data, first_blkno: int, max_lsn: int) -> tuple[int, list[pc.BadPage]]:
    checked, bad = NATIVE.check_chunk(data, first_blkno, max_lsn)
    return checked, [pc.BadPage(*b) for b in bad]


def _reference_check_chunk(data: Data, first_blkno: int, max_lsn: int) -> tuple[int, list[pc.BadPage]]:
    """check_chunk's contract spelled out page by page with ``checksum_page_slow``."""
    checked, bad = 0, []
    for p in range(len(data) // pc.BLCKSZ):
        page = bytes(data[p * pc.BLCKSZ : (p + 1) * pc.BLCKSZ])
        xlogid, xrecoff, stored, _flags, _lower, upper = struct.unpack_from("<IIHHHH", page)
        block = first_blkno + p
        if upper == 0:
            if page != bytes(pc.BLCKSZ):
                bad.append(pc.BadPage(block, 0, -1))
        elif (xlogid << 32 | xrecoff) < max_lsn:
            checked += 1
            expected = pc.checksum_page_slow(page, block)
            if expected != stored:
                bad.append(pc.BadPage(block, expected, stored))
    return checked, bad


needs_native = pytest.mark.skipif(NATIVE is None, reason="C extension not built (test_native_is_built says why)")
IMPLS: list[Any] = [
    pytest.param(_native_check_chunk, id="native", marks=needs_native),
    pytest.param(pc._check_chunk_numpy, id="numpy"),
]


def _mixed_chunk(rng: random.Random, first_blkno: int) -> bytes:
    """Signed, corrupted, new (zero and not), and recent pages around MAX_LSN, then a partial page."""
    pages: list[bytearray] = []
    for i in range(24):
        b = first_blkno + i
        kind = i % 8
        if kind == 0:
            pages.append(_sign(_page(rng), b))
        elif kind == 1:  # corrupted after signing
            page = _sign(_page(rng), b)
            page[rng.randrange(16, pc.BLCKSZ)] ^= 1 << rng.randrange(8)
            pages.append(page)
        elif kind == 2:  # pd_checksum itself damaged
            page = _sign(_page(rng), b)
            page[8] ^= 0x40
            pages.append(page)
        elif kind == 3:
            pages.append(bytearray(pc.BLCKSZ))  # new and all zero: fine
        elif kind == 4:  # new (pd_upper == 0) but not all zero
            page = bytearray(pc.BLCKSZ)
            page[rng.randrange(pc.BLCKSZ)] = 1 + rng.randrange(255)
            if page[14:16] != b"\0\0":
                page[14:16] = b"\0\0"
                page[100] = 7
            pages.append(page)
        else:  # LSN just below, at, just above max_lsn; unsigned: only the first is checked (and bad)
            pages.append(_page(rng, lsn=MAX_LSN - 1 + (kind - 5)))
    return b"".join(pages) + rng.randbytes(pc.BLCKSZ - 1)


def _inputs(data: bytes) -> list[Data]:
    unaligned = memoryview(bytearray(b"\x55" + data))[1:]
    return [data, bytearray(data), memoryview(data), unaligned]


@pytest.mark.parametrize("check", IMPLS)
def test_mixed_chunk_matches_reference(check: CheckChunk) -> None:
    rng = random.Random(3)
    data = _mixed_chunk(rng, 40)
    want = _reference_check_chunk(data, 40, MAX_LSN)
    # Each round of 8 pages: kinds 0, 1, 2 and 5 are checked; 1, 2, 4 (new, not zero) and 5 (unsigned) are bad.
    assert want[0] == 3 * 4 and [(b.block - 40) % 8 for b in want[1]] == [1, 2, 4, 5] * 3
    for data_in in _inputs(data):
        assert check(data_in, 40, MAX_LSN) == want
    # Other cut-offs: everything recent, nothing recent.
    assert check(data, 40, 0) == _reference_check_chunk(data, 40, 0)
    assert check(data, 40, 1 << 63) == _reference_check_chunk(data, 40, 1 << 63)


@pytest.mark.parametrize("check", IMPLS)
def test_real_page(check: CheckChunk) -> None:
    assert check(REAL_PAGE, 0, 1 << 62) == (1, [])
    assert check(REAL_PAGE, 7, 1 << 62) == (1, [pc.BadPage(7, pc.checksum_page_slow(REAL_PAGE, 7), REAL_CHECKSUM)])
    assert check(REAL_PAGE, 1 << 32, 1 << 62) == (1, [])  # BlockNumber is uint32: block 2**32 checksums as 0


@pytest.mark.parametrize("check", IMPLS)
def test_block_numbers_wrap_at_2_to_32(check: CheckChunk) -> None:
    rng = random.Random(5)
    first = (1 << 32) - 3
    pages = [_sign(_page(rng), (first + i) & 0xFFFFFFFF) for i in range(6)]  # signed as PostgreSQL would
    pages[4][3000] ^= 2
    data = b"".join(pages)
    checked, bad = check(data, first, MAX_LSN)
    assert checked == 6 and [b.block for b in bad] == [first + 4]  # reported unwrapped, as given
    assert (checked, bad) == _reference_check_chunk(data, first, MAX_LSN)
    shifted = first + (1 << 32)  # the same uint32 block numbers: the same checksums
    assert check(data, shifted, MAX_LSN) == (6, [pc.BadPage(shifted + 4, bad[0].expected, bad[0].found)])


@pytest.mark.parametrize("check", IMPLS)
def test_empty_and_partial_input(check: CheckChunk) -> None:
    for data in (b"", bytearray(), memoryview(b""), b"\xff" * (pc.BLCKSZ - 1)):
        assert check(data, 0, MAX_LSN) == (0, [])


@pytest.mark.parametrize("check", IMPLS)
def test_bad_arguments(check: CheckChunk) -> None:
    with pytest.raises(TypeError):
        check("x" * pc.BLCKSZ, 0, MAX_LSN)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        check(bytes(_page(random.Random(1))), 0, -1)
    with pytest.raises(BufferError):
        check(memoryview(bytes(2 * pc.BLCKSZ))[::2], 0, MAX_LSN)


@needs_native
def test_native_checksums_match() -> None:
    rng = random.Random(9)
    data = b"".join(_page(rng) for _ in range(5))
    for first in (0, 77, (1 << 32) - 2):
        want = [pc.checksum_page_slow(data[i * pc.BLCKSZ : (i + 1) * pc.BLCKSZ], first + i) for i in range(5)]
        assert pc._checksum_pages_numpy(data, first) == want
        for data_in in _inputs(data + b"tail"):
            assert NATIVE.checksums(data_in, first) == want
    assert NATIVE.checksums(b"", 0) == []
    assert NATIVE.checksums(REAL_PAGE, 0) == [REAL_CHECKSUM]


@needs_native
def test_native_agrees_with_numpy_on_random_chunks() -> None:
    """Many pages, some signed, in one big chunk (several numpy batches): the two paths agree exactly."""
    rng = random.Random(11)
    n = pc.GROUP_PAGES + 40
    pages = [_page(rng, lsn=rng.choice((1, MAX_LSN - 1, MAX_LSN, 1 << 40)), upper=rng.choice((0, 1, 100))) for _ in range(n)]
    for i in range(0, n, 3):
        if pages[i][14:16] != b"\0\0":
            _sign(pages[i], 1000 + i)
    for i in range(0, n, 17):
        pages[i] = bytearray(pc.BLCKSZ)
    data = b"".join(pages)
    native = _native_check_chunk(data, 1000, MAX_LSN)
    assert native == pc._check_chunk_numpy(data, 1000, MAX_LSN)
    assert native[0] > 0 and native[1]


@needs_native
def test_native_threads_agree() -> None:
    """The C loop runs without the GIL: threads checking the same buffer at once get the same answer."""
    data = _mixed_chunk(random.Random(3), 40) * 20
    want = _native_check_chunk(data, 40, MAX_LSN)
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(_native_check_chunk(data, 40, MAX_LSN))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 4


def test_public_api_uses_the_active_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _mixed_chunk(random.Random(4), 0)
    want = _reference_check_chunk(data, 0, MAX_LSN)
    assert pc.check_chunk(data, 0, MAX_LSN) == want
    assert pc.checksum_pages(REAL_PAGE, 0) == [REAL_CHECKSUM]
    monkeypatch.setattr(pc, "_native", None)  # the fallback, through the public functions
    assert pc.check_chunk(data, 0, MAX_LSN) == want
    assert pc.checksum_pages(REAL_PAGE, 0) == [REAL_CHECKSUM]


def test_environment_forces_numpy() -> None:
    code = "from saveit_backup.pg import pagecheck as pc; print(pc.NATIVE, pc._native is None)"
    env = dict(os.environ, SAVEIT_PAGECHECK="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_native_is_built() -> None:
    """Where a C compiler and Python's headers exist (CI installs both), the install built the extension."""
    if os.environ.get("SAVEIT_PAGECHECK", "").lower() == "numpy":
        assert not pc.NATIVE
        return
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = sysconfig.get_config_var("INCLUDEPY") or sysconfig.get_paths()["include"]
    if shutil.which(cc) is None or not os.path.exists(os.path.join(include, "Python.h")):
        pytest.skip(f"no C compiler ({cc}) or no Python.h in {include}: the numpy fallback is expected")
    assert NATIVE is not None, "saveit_backup.pg._pagecheck was not built: reinstall (pip install -e .) with gcc and python3-dev"
    assert pc.NATIVE
