"""PostgreSQL data page checksums (``pg_checksum_page``), checked while a base backup reads files.

The algorithm (``src/include/storage/checksum_impl.h``): the 8 KiB page, with ``pd_checksum``
taken as zero, is read as 64 rows of 32 little-endian uint32 words; 32 FNV-1a-like lanes
(``tmp = sum ^ word; sum = tmp * FNV_PRIME ^ (tmp >> 17)`` in 32 bits) each take one column,
then two rounds with zero words; the lanes are XOR-folded, XORed with the block number and
reduced to ``1..65535``.

A word-at-a-time loop in Python costs about 2 ms per page (4 MB/s); ``_folds`` vectorises the
lanes of many pages with numpy instead (the reference loop stays as ``checksum_page_slow``).
The C extension ``_pagecheck`` (built by setup.py when a compiler is there) does the same several
times faster, without the GIL; ``NATIVE`` tells whether it is in use, and ``SAVEIT_PAGECHECK=numpy``
in the environment (read at import) forces the numpy code.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from functools import reduce
from operator import xor
from typing import Any

BLCKSZ = 8192
RELSEG_SIZE = 131072  # blocks per relation segment file (1 GiB)
N_SUMS = 32
FNV_PRIME = 16777619
ROWS = BLCKSZ // (4 * N_SUMS)
BASE_OFFSETS = (
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
)  # fmt: skip
_HEADER = struct.Struct("<IIHHHH")  # pd_lsn (xlogid, xrecoff), pd_checksum, pd_flags, pd_lower, pd_upper
_ZERO_PAGE = bytes(BLCKSZ)
# Relation data files: <relfilenode>[_fsm|_vm|_init][.<segment>] under base/, global/ and tablespaces.
_RELFILE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.(\d+))?$")

_native: Any = None  # the C extension, or None: numpy
if os.environ.get("SAVEIT_PAGECHECK", "").lower() != "numpy":
    try:
        from saveit_backup.pg import _pagecheck as _native
    except ImportError:  # built without a compiler (setup.py: optional)
        pass
NATIVE: bool = _native is not None


def relation_segment(path: str) -> int | None:
    """The segment number of a relation data file (``base/5/16384.2`` -> 2), None for other files."""
    parts = path.split("/")
    if not (parts[0] in ("base", "global") or (parts[0] == "pg_tblspc" and len(parts) > 3)):
        return None
    m = _RELFILE.match(parts[-1])
    if not m:
        return None
    return int(m.group(3) or 0)


def checksum_page_slow(page: bytes, blkno: int) -> int:
    """Reference implementation, word by word (for tests)."""
    words = list(struct.unpack(f"<{BLCKSZ // 4}I", page))
    words[2] &= 0xFFFF0000  # pd_checksum (low half of word 2, little-endian) counts as zero
    sums = list(BASE_OFFSETS)
    for i in range(ROWS + 2):
        for j in range(N_SUMS):
            value = words[i * N_SUMS + j] if i < ROWS else 0
            tmp = sums[j] ^ value
            sums[j] = ((tmp * FNV_PRIME) ^ (tmp >> 17)) & 0xFFFFFFFF
    result = reduce(xor, sums) ^ blkno
    return (result & 0xFFFFFFFF) % 65535 + 1


GROUP_PAGES = 512  # pages per vectorised batch (4 MiB, one backup read): few, larger numpy calls, few GIL hand-offs


def _folds(data: bytes | bytearray | memoryview) -> Any:
    """The block-independent part of the checksum (XOR of the 32 lanes) of every full page of ``data``.

    numpy runs each of the 66 rounds over all lanes of all pages of a batch at once (uint32
    arithmetic wraps exactly like C's) with in-place operations on row-contiguous arrays; its loops
    release the GIL, so worker threads check in parallel.
    """
    import numpy as np

    npages = len(data) // BLCKSZ
    prime, shift = np.uint32(FNV_PRIME), np.uint32(17)
    base = np.array(BASE_OFFSETS, dtype=np.uint32)
    out: list[Any] = []
    for g in range(0, npages, GROUP_PAGES):
        n = min(GROUP_PAGES, npages - g)
        words = np.frombuffer(data, dtype="<u4", count=n * BLCKSZ // 4, offset=g * BLCKSZ).reshape(n, ROWS, N_SUMS)
        rows = words.transpose(1, 0, 2).copy()  # (ROWS, pages, lanes), C order: row i is one block; writable
        rows[0, :, 2] &= np.uint32(0xFFFF0000)  # pd_checksum (bytes 8-9) counts as zero
        sums = np.tile(base, (n, 1))
        tmp = np.empty_like(sums)
        shifted = np.empty_like(sums)
        for i in range(ROWS + 2):  # the last two rounds mix in zero words
            if i < ROWS:
                np.bitwise_xor(sums, rows[i], out=tmp)
            else:
                tmp[...] = sums
            np.right_shift(tmp, shift, out=shifted)
            np.multiply(tmp, prime, out=sums)
            np.bitwise_xor(sums, shifted, out=sums)
        out.append(np.bitwise_xor.reduce(sums, axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint32)


def _final(folds: Any, blknos: Any) -> Any:
    """Checksums from folds and block numbers (numpy arrays): ``(fold ^ blkno) % 65535 + 1`` in 32 bits."""
    import numpy as np

    return ((folds.astype(np.uint64) ^ blknos) & np.uint64(0xFFFFFFFF)) % np.uint64(65535) + np.uint64(1)


def checksum_pages(data: bytes | bytearray | memoryview, first_blkno: int) -> list[int]:
    """``pg_checksum_page`` of every full page of ``data`` (blocks ``first_blkno`` onward), vectorised."""
    if _native is not None:
        return _native.checksums(data, first_blkno)  # type: ignore[no-any-return]
    return _checksum_pages_numpy(data, first_blkno)


def _checksum_pages_numpy(data: bytes | bytearray | memoryview, first_blkno: int) -> list[int]:
    import numpy as np

    folds = _folds(data)
    return [int(x) for x in _final(folds, np.arange(len(folds), dtype=np.uint64) + np.uint64(first_blkno))]


@dataclass(frozen=True)
class BadPage:
    block: int
    expected: int
    found: int


def check_chunk(data: bytes | bytearray | memoryview, first_blkno: int, max_lsn: int) -> tuple[int, list[BadPage]]:
    """Verify the pages of ``data`` (block ``first_blkno`` onward): (pages checked, bad pages).

    Skipped like PostgreSQL's base backup does: new pages (``pd_upper == 0``; all-zero pages must be all
    zero), and pages whose LSN is at or after ``max_lsn`` (the backup start: a concurrent write may be torn,
    and WAL replay rewrites it from a full-page image).  A trailing partial page is ignored.  Block numbers
    enter the checksum as PostgreSQL's uint32 ``BlockNumber`` (modulo 2**32); bad pages come in block order.
    """
    if _native is not None:
        checked, bad = _native.check_chunk(data, first_blkno, max_lsn)  # no GIL while it runs
        return checked, [BadPage(*b) for b in bad]
    return _check_chunk_numpy(data, first_blkno, max_lsn)


def _check_chunk_numpy(data: bytes | bytearray | memoryview, first_blkno: int, max_lsn: int) -> tuple[int, list[BadPage]]:
    import numpy as np

    npages = len(data) // BLCKSZ
    if npages == 0:
        return 0, []
    pages = np.frombuffer(data, dtype="<u4", count=npages * BLCKSZ // 4).reshape(npages, BLCKSZ // 4)
    lsn = (pages[:, 0].astype(np.uint64) << np.uint64(32)) | pages[:, 1]
    new = (pages[:, 3] >> np.uint32(16)) == 0  # pd_upper == 0
    fresh = np.flatnonzero(new)
    bad: list[BadPage] = [BadPage(first_blkno + int(p), 0, -1) for p in fresh[pages[fresh].any(axis=1)]]
    candidates = np.flatnonzero(~new & (lsn < np.uint64(max_lsn)))
    if candidates.size == 0:
        return 0, bad
    batch = data if candidates.size == npages else pages[candidates].tobytes()
    found = pages[candidates, 2] & np.uint32(0xFFFF)
    expected = _final(_folds(batch), candidates.astype(np.uint64) + np.uint64(first_blkno))  # vectorised: no per-page Python
    for i in np.flatnonzero(expected != found).tolist():
        bad.append(BadPage(first_blkno + int(candidates[i]), int(expected[i]), int(found[i])))
    bad.sort(key=lambda b: b.block)
    return int(candidates.size), bad
