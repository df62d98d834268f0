"""PostgreSQL data page checksums (``pg_checksum_page``), checked while a base backup reads files.

The algorithm (``src/include/storage/checksum_impl.h``): the 8 KiB page, with ``pd_checksum``
taken as zero, is read as 64 rows of 32 little-endian uint32 words; 32 FNV-1a-like lanes
(``tmp = sum ^ word; sum = tmp * FNV_PRIME ^ (tmp >> 17)`` in 32 bits) each take one column,
then two rounds with zero words; the lanes are XOR-folded, XORed with the block number and
reduced to ``1..65535``.

A word-at-a-time loop in Python costs about 2 ms per page (4 MB/s).  Here every lane of every
page in a chunk lives in its own 64-bit slot of one big Python integer, so each of the 66 rounds
is a handful of big-integer operations (multiply, shift, xor, mask) over the whole chunk: a
uint32 times the 24-bit prime stays below 2**56, so lanes never carry into each other, and the
bits that ``>> 17`` drags in from the next lane land above bit 32 where the mask removes them.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import reduce
from operator import xor

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
_LANE_BYTES = b"".join(v.to_bytes(8, "little") for v in BASE_OFFSETS)
# Relation data files: <relfilenode>[_fsm|_vm|_init][.<segment>] under base/, global/ and tablespaces.
_RELFILE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.(\d+))?$")


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


def _spread(data: bytes | bytearray | memoryview) -> bytearray:
    """Each uint32 of ``data`` followed by four zero bytes (a 64-bit slot per word)."""
    out = bytearray(2 * len(data))
    for k in range(4):
        out[k::8] = data[k::4]
    return out


GROUP_PAGES = 16  # pages per big-integer batch (measured fastest: 64 KiB..256 KiB)


def _folds(data: bytes | bytearray | memoryview) -> list[int]:
    """The block-independent part of the checksum (XOR of the 32 lanes) of every full page of ``data``."""
    npages = len(data) // BLCKSZ
    if npages > GROUP_PAGES:
        out: list[int] = []
        for g in range(0, npages, GROUP_PAGES):
            out += _folds(data[g * BLCKSZ : min(npages, g + GROUP_PAGES) * BLCKSZ])
        return out
    if npages == 0:
        return []
    buf = bytearray(data[: npages * BLCKSZ])
    zero = bytes(npages)
    buf[8::BLCKSZ] = zero  # pd_checksum counts as zero
    buf[9::BLCKSZ] = zero
    view = memoryview(_spread(buf))
    row_bytes = N_SUMS * 8
    page_bytes = BLCKSZ * 2
    slots = npages * N_SUMS
    mask = int.from_bytes(b"\xff\xff\xff\xff\x00\x00\x00\x00" * slots, "little")
    sums = int.from_bytes(_LANE_BYTES * npages, "little")
    for i in range(ROWS):
        start = i * row_bytes
        row = b"".join([view[p * page_bytes + start : p * page_bytes + start + row_bytes] for p in range(npages)])
        tmp = sums ^ int.from_bytes(row, "little")
        sums = ((tmp * FNV_PRIME) ^ (tmp >> 17)) & mask
    for _ in range(2):
        sums = ((sums * FNV_PRIME) ^ (sums >> 17)) & mask
    lanes = struct.unpack(f"<{slots}Q", sums.to_bytes(slots * 8, "little"))
    return [reduce(xor, lanes[p * N_SUMS : (p + 1) * N_SUMS]) for p in range(npages)]


def _final(fold: int, blkno: int) -> int:
    return ((fold ^ blkno) & 0xFFFFFFFF) % 65535 + 1


def checksum_pages(data: bytes | bytearray | memoryview, first_blkno: int) -> list[int]:
    """``pg_checksum_page`` of every full page of ``data`` (blocks ``first_blkno`` onward), vectorised."""
    return [_final(f, first_blkno + p) for p, f in enumerate(_folds(data))]


@dataclass(frozen=True)
class BadPage:
    block: int
    expected: int
    found: int


def check_chunk(data: bytes | bytearray | memoryview, first_blkno: int, max_lsn: int) -> tuple[int, list[BadPage]]:
    """Verify the pages of ``data`` (block ``first_blkno`` onward): (pages checked, bad pages).

    Skipped like PostgreSQL's base backup does: new pages (``pd_upper == 0``; all-zero pages must be all
    zero), and pages whose LSN is at or after ``max_lsn`` (the backup start: a concurrent write may be torn,
    and WAL replay rewrites it from a full-page image).  A trailing partial page is ignored.
    """
    npages = len(data) // BLCKSZ
    candidates: list[int] = []
    bad: list[BadPage] = []
    for p in range(npages):
        xlogid, xrecoff, _, _, _, upper = _HEADER.unpack_from(data, p * BLCKSZ)
        if upper == 0:
            if bytes(data[p * BLCKSZ : (p + 1) * BLCKSZ]) != _ZERO_PAGE:  # a "new" page must be all zeros
                bad.append(BadPage(first_blkno + p, 0, -1))
            continue
        if ((xlogid << 32) | xrecoff) >= max_lsn:
            continue
        candidates.append(p)
    if not candidates:
        return 0, bad
    view = memoryview(data)
    batch = view[: npages * BLCKSZ] if len(candidates) == npages else b"".join(
        view[p * BLCKSZ : (p + 1) * BLCKSZ] for p in candidates)
    for p, fold in zip(candidates, _folds(batch), strict=True):
        expected = _final(fold, first_blkno + p)
        found = struct.unpack_from("<H", data, p * BLCKSZ + 8)[0]
        if expected != found:
            bad.append(BadPage(first_blkno + p, expected, found))
    return len(candidates), bad
