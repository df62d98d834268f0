"""WAL arithmetic: LSNs, segment names, segment headers (pure, no I/O); timelines, archive continuity and
``backup_label`` are in ``domain.timeline``.

Everything here follows the definitions in PostgreSQL's ``src/include/access/xlog_internal.h``:

* an LSN is a 64-bit byte position, written ``%X/%X`` (high and low 32 bits);
* a segment is ``wal_segment_size`` bytes; segment number ``segno = lsn // segsize``;
* a segment file is named ``TTTTTTTTLLLLLLLLSSSSSSSS``: timeline, ``segno // segments_per_id``
  and ``segno % segments_per_id`` in upper-case hex, where ``segments_per_id = 2**32 // segsize``;
* ``TTTTTTTT.history`` lists the ancestors of a timeline and where each one ended;
* ``<segment>.XXXXXXXX.backup`` is the backup-history file written by ``pg_backup_stop``;
* ``<segment>.partial`` is the last, incomplete segment of a timeline left by a promotion.
"""

from __future__ import annotations

import re
import struct
from enum import StrEnum
from typing import NamedTuple, overload

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
MIN_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 1024 * 1024 * 1024
MAX_LSN = 0xFFFF_FFFF_FFFF_FFFF
MAX_TIMELINE = 0xFFFF_FFFF

# ---------------------------------------------------------------------------------
# LSN
# ---------------------------------------------------------------------------------
# Patterns, not compiled ones: ``re.match`` compiles each on first use (and caches it); a wal-push uses
# one or two of them, and compiling all at import cost about 1 ms of every archive_command.
_LSN_RE = r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$"


class Lsn:
    """A WAL location (``pg_lsn``): a 64-bit byte position, shown as ``16/B374D848``. Immutable, ordered, hashable.

    A plain class rather than a dataclass: this module is on wal-push's cold-start path.
    """

    __slots__ = ("value",)
    value: int

    def __init__(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"LSN value must be an int, not {type(value).__name__}")
        if not 0 <= value <= MAX_LSN:
            raise ValueError(f"LSN {value} is outside 0..2^64-1")
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Lsn is immutable")

    def __reduce__(self) -> tuple[type[Lsn], tuple[int]]:
        return (Lsn, (self.value,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lsn) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __lt__(self, other: Lsn) -> bool:
        return self.value < other.value

    def __le__(self, other: Lsn) -> bool:
        return self.value <= other.value

    def __gt__(self, other: Lsn) -> bool:
        return self.value > other.value

    def __ge__(self, other: Lsn) -> bool:
        return self.value >= other.value

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse ``"16/B374D848"`` (hex, either case, surrounding spaces ignored)."""
        m = re.match(_LSN_RE, text.strip())
        if not m:
            raise ValueError(f"invalid LSN {text!r}: expected two hex numbers separated by '/', like 16/B374D848")
        return cls((int(m.group(1), 16) << 32) | int(m.group(2), 16))

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __add__(self, other: int) -> Lsn:
        if isinstance(other, Lsn) or not isinstance(other, int):
            return NotImplemented
        return Lsn(self.value + other)

    def __radd__(self, other: int) -> Lsn:
        return self.__add__(other)

    @overload
    def __sub__(self, other: Lsn) -> int: ...

    @overload
    def __sub__(self, other: int) -> Lsn: ...

    def __sub__(self, other: Lsn | int) -> Lsn | int:
        """``lsn - lsn`` is a byte distance (int); ``lsn - n`` is an earlier LSN."""
        if isinstance(other, Lsn):
            return self.value - other.value
        if isinstance(other, int):
            return Lsn(self.value - other)
        return NotImplemented


def as_lsn(value: Lsn | str | int) -> Lsn:
    """Accept an Lsn, its text form or its integer value."""
    if isinstance(value, Lsn):
        return value
    if isinstance(value, str):
        return Lsn.parse(value)
    return Lsn(value)


# ---------------------------------------------------------------------------------
# Segment names
# ---------------------------------------------------------------------------------
def check_segment_size(segsize: int) -> int:
    """Return ``segsize`` if PostgreSQL allows it (a power of two from 1 MiB to 1 GiB)."""
    if not (MIN_SEGMENT_SIZE <= segsize <= MAX_SEGMENT_SIZE) or segsize & (segsize - 1):
        raise ValueError(f"invalid WAL segment size {segsize}: must be a power of two between 1 MiB and 1 GiB")
    return segsize


def segments_per_xlogid(segsize: int = DEFAULT_SEGMENT_SIZE) -> int:
    return 0x1_0000_0000 // check_segment_size(segsize)


class Segment(NamedTuple):
    """A segment identity: timeline and segment number."""

    tli: int
    segno: int


def check_timeline(tli: int) -> None:
    if not 1 <= tli <= MAX_TIMELINE:
        raise ValueError(f"invalid timeline {tli}: must be between 1 and {MAX_TIMELINE}")


def segment_name(tli: int, segno: int, segsize: int = DEFAULT_SEGMENT_SIZE) -> str:
    """``segment_name(1, 2) == "000000010000000000000002"``."""
    check_timeline(tli)
    per = segments_per_xlogid(segsize)
    if not 0 <= segno <= MAX_LSN // segsize:
        raise ValueError(f"invalid segment number {segno} for segment size {segsize}")
    return f"{tli:08X}{segno // per:08X}{segno % per:08X}"


_SEGMENT_RE = r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$"


def parse_segment_name(name: str, segsize: int = DEFAULT_SEGMENT_SIZE) -> Segment:
    """``"000000010000000100000002"`` -> ``Segment(tli=1, segno=258)`` (16 MiB segments)."""
    m = re.match(_SEGMENT_RE, name)
    if not m:
        raise ValueError(f"invalid WAL segment name {name!r}: expected 24 upper-case hex digits")
    tli, log, seg = (int(g, 16) for g in m.groups())
    if tli == 0:
        raise ValueError(f"invalid WAL segment name {name!r}: timeline 0 does not exist")
    per = segments_per_xlogid(segsize)
    if seg >= per:
        raise ValueError(
            f"invalid WAL segment name {name!r}: segment part {seg:08X} is out of range for "
            f"{segsize // (1024 * 1024)} MiB segments (max {per - 1:08X})"
        )
    return Segment(tli, log * per + seg)


def lsn_to_segno(lsn: Lsn | str | int, segsize: int = DEFAULT_SEGMENT_SIZE) -> int:
    return int(as_lsn(lsn)) // check_segment_size(segsize)


def lsn_to_segment(lsn: Lsn | str | int, tli: int, segsize: int = DEFAULT_SEGMENT_SIZE) -> str:
    """Name of the segment file of timeline ``tli`` that contains byte ``lsn`` (PG's ``XLByteToSeg``)."""
    return segment_name(tli, lsn_to_segno(lsn, segsize), segsize)


def segment_start_lsn(name: str, segsize: int = DEFAULT_SEGMENT_SIZE) -> Lsn:
    """First LSN of a segment: its ``xlp_pageaddr``."""
    return Lsn(parse_segment_name(name, segsize).segno * segsize)


def next_segment_name(name: str, segsize: int = DEFAULT_SEGMENT_SIZE) -> str:
    tli, segno = parse_segment_name(name, segsize)
    return segment_name(tli, segno + 1, segsize)


def segment_range(start: Lsn | str | int, end: Lsn | str | int, tli: int, segsize: int = DEFAULT_SEGMENT_SIZE) -> list[str]:
    """Names of the segments of timeline ``tli`` holding bytes ``start`` .. ``end``, both inclusive."""
    first, last = lsn_to_segno(start, segsize), lsn_to_segno(end, segsize)
    if last < first:
        raise ValueError(f"WAL range end {as_lsn(end)} is before its start {as_lsn(start)}")
    return [segment_name(tli, s, segsize) for s in range(first, last + 1)]


# ---------------------------------------------------------------------------------
# Archive file names
# ---------------------------------------------------------------------------------
class WalFileKind(StrEnum):
    SEGMENT = "segment"
    PARTIAL = "partial"
    HISTORY = "history"
    BACKUP = "backup"
    INVALID = "invalid"


class ArchiveFile(NamedTuple):
    """A classified archive file name. ``segment`` is the 24-character segment part (None for history files)."""

    name: str
    kind: WalFileKind
    tli: int | None = None
    segment: str | None = None


_PARTIAL_RE = r"^([0-9A-F]{24})\.partial$"
_HISTORY_RE = r"^([0-9A-F]{8})\.history$"
_BACKUP_RE = r"^([0-9A-F]{24})\.([0-9A-F]{8})\.backup$"


def classify_archive_name(name: str, segsize: int = DEFAULT_SEGMENT_SIZE) -> ArchiveFile:
    """Classify a file name found in (or pushed to) the WAL archive; anything unrecognised is INVALID."""
    invalid = ArchiveFile(name, WalFileKind.INVALID)
    m = re.match(_HISTORY_RE, name)
    if m:
        tli = int(m.group(1), 16)
        return ArchiveFile(name, WalFileKind.HISTORY, tli) if tli >= 1 else invalid
    kind = WalFileKind.SEGMENT
    seg = name
    m = re.match(_PARTIAL_RE, name)
    if m:
        kind, seg = WalFileKind.PARTIAL, m.group(1)
    else:
        m = re.match(_BACKUP_RE, name)
        if m:
            kind, seg = WalFileKind.BACKUP, m.group(1)
            if int(m.group(2), 16) >= segsize:
                return invalid
    try:
        tli, _ = parse_segment_name(seg, segsize)
    except ValueError:
        return invalid
    return ArchiveFile(name, kind, tli, seg)


def history_file_name(tli: int) -> str:
    check_timeline(tli)
    return f"{tli:08X}.history"


def backup_history_file_name(start_lsn: Lsn | str | int, tli: int, segsize: int = DEFAULT_SEGMENT_SIZE) -> str:
    """``000000010000000000000002.00000028.backup`` for a backup that started at 0/2000028 on timeline 1."""
    lsn = as_lsn(start_lsn)
    return f"{lsn_to_segment(lsn, tli, segsize)}.{int(lsn) % segsize:08X}.backup"


# ---------------------------------------------------------------------------------
# Segment page header
# ---------------------------------------------------------------------------------
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
XLP_BKP_REMOVABLE = 0x0004
XLP_ALL_FLAGS = 0x0007
LONG_PAGE_HEADER_SIZE = 40
# magic, info, tli, pageaddr, rem_len, (4 bytes padding), sysid, seg_size, xlog_blcksz
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
assert _LONG_HEADER.size == LONG_PAGE_HEADER_SIZE

XLOG_PAGE_MAGIC_VERSIONS: dict[int, int] = {
    0xD093: 9_6,
    0xD097: 10,
    0xD098: 11,
    0xD101: 12,
    0xD106: 13,
    0xD10D: 14,
    0xD110: 15,
    0xD113: 16,
    0xD116: 17,
    0xD118: 18,
}


class WalPageHeader(NamedTuple):
    """The long page header at the start of every WAL segment file."""

    magic: int
    info: int
    tli: int
    pageaddr: Lsn
    rem_len: int
    sysid: int
    seg_size: int
    xlog_blcksz: int

    @property
    def pg_major(self) -> int | None:
        """PostgreSQL major version that writes this magic (96 for 9.6), None if unknown."""
        return XLOG_PAGE_MAGIC_VERSIONS.get(self.magic)


def parse_long_page_header(data: bytes) -> WalPageHeader:
    """Decode the first 40 bytes of a WAL segment file (little-endian, as on x86 and ARM)."""
    if len(data) < LONG_PAGE_HEADER_SIZE:
        raise ValueError(f"WAL segment header too short: {len(data)} bytes, need {LONG_PAGE_HEADER_SIZE}")
    magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz = _LONG_HEADER.unpack_from(data)
    if magic >> 12 != 0xD:
        raise ValueError(f"not a WAL segment: page magic {magic:#06x} is not a PostgreSQL WAL magic (0xDxxx)")
    if info & ~XLP_ALL_FLAGS:
        raise ValueError(f"not a WAL segment: invalid page info flags {info:#06x}")
    if not info & XLP_LONG_HEADER:
        raise ValueError("not the start of a WAL segment: first page lacks the long header flag")
    return WalPageHeader(magic, info, tli, Lsn(pageaddr), rem_len, sysid, seg_size, blcksz)


def check_segment_header(
    name: str,
    header_bytes: bytes,
    segsize: int | None = None,
    sysid: int | None = None,
) -> WalPageHeader:
    """Check that a segment's first page matches its file name; return the decoded header.

    ``name`` may be a segment or a ``.partial`` name. ``segsize`` (if given) must match the header's
    segment size, ``sysid`` (if given) the header's system identifier. Raises ValueError naming the
    mismatch, which is how ``wal-push`` refuses a misnamed or foreign segment.
    """
    info = classify_archive_name(name, segsize or MIN_SEGMENT_SIZE)  # most permissive until the header says
    if info.kind not in (WalFileKind.SEGMENT, WalFileKind.PARTIAL) or info.segment is None:
        raise ValueError(f"{name!r} is not a WAL segment file name")
    hdr = parse_long_page_header(header_bytes)
    try:
        check_segment_size(hdr.seg_size)
    except ValueError:
        raise ValueError(f"WAL segment {name}: header has invalid segment size {hdr.seg_size}") from None
    if segsize is not None and hdr.seg_size != segsize:
        raise ValueError(f"WAL segment {name}: header segment size {hdr.seg_size} does not match expected {segsize}")
    if sysid is not None and hdr.sysid != sysid:
        raise ValueError(f"WAL segment {name}: system identifier {hdr.sysid} does not match this cluster's {sysid}")
    tli, segno = parse_segment_name(info.segment, hdr.seg_size)
    # After a promotion the first segment of the new timeline is a copy of the parent's segment,
    # so its first page still carries the parent's (lower) timeline; a higher one never fits.
    if hdr.tli > tli:
        raise ValueError(f"WAL segment {name}: header timeline {hdr.tli} is newer than the file name's timeline {tli}")
    expected = Lsn(segno * hdr.seg_size)
    if hdr.pageaddr != expected:
        actual = (
            segment_name(tli, int(hdr.pageaddr) // hdr.seg_size, hdr.seg_size)
            if int(hdr.pageaddr) % hdr.seg_size == 0 and int(hdr.pageaddr) // hdr.seg_size <= MAX_LSN // hdr.seg_size
            else "?"
        )
        raise ValueError(
            f"WAL segment {name}: header page address {hdr.pageaddr} does not match the file name "
            f"(expected {expected}; the content belongs to segment {actual})"
        )
    return hdr
