"""WAL arithmetic: LSNs, segment names, timelines, archive continuity (pure, no I/O).

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
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, TypedDict, overload

if TYPE_CHECKING:
    from datetime import datetime

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


def _check_tli(tli: int) -> None:
    if not 1 <= tli <= MAX_TIMELINE:
        raise ValueError(f"invalid timeline {tli}: must be between 1 and {MAX_TIMELINE}")


def segment_name(tli: int, segno: int, segsize: int = DEFAULT_SEGMENT_SIZE) -> str:
    """``segment_name(1, 2) == "000000010000000000000002"``."""
    _check_tli(tli)
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
    _check_tli(tli)
    return f"{tli:08X}.history"


def backup_history_file_name(start_lsn: Lsn | str | int, tli: int, segsize: int = DEFAULT_SEGMENT_SIZE) -> str:
    """``000000010000000000000002.00000028.backup`` for a backup that started at 0/2000028 on timeline 1."""
    lsn = as_lsn(start_lsn)
    return f"{lsn_to_segment(lsn, tli, segsize)}.{int(lsn) % segsize:08X}.backup"


# ---------------------------------------------------------------------------------
# Timeline history
# ---------------------------------------------------------------------------------
class TimelineSwitch(NamedTuple):
    """Timeline ``tli`` ended at ``switch_lsn``; its child starts there."""

    tli: int
    switch_lsn: Lsn
    reason: str = ""


def parse_history(text: str) -> list[TimelineSwitch]:
    """Parse the contents of a ``.history`` file, like PostgreSQL's ``readTimeLineHistory``.

    Each line is ``parentTLI<TAB>switchpoint<TAB>reason``; blank lines and ``#`` comments are skipped.
    Timeline ids must increase and switch points must not go backwards.
    """
    out: list[TimelineSwitch] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2:
            raise ValueError(f"invalid timeline history line {lineno}: {raw!r}: expected 'tli<TAB>lsn<TAB>reason'")
        try:
            tli = int(parts[0])
        except ValueError:
            raise ValueError(f"invalid timeline history line {lineno}: timeline {parts[0]!r} is not a number") from None
        try:
            lsn = Lsn.parse(parts[1])
        except ValueError as exc:
            raise ValueError(f"invalid timeline history line {lineno}: {exc}") from None
        if tli < 1:
            raise ValueError(f"invalid timeline history line {lineno}: timeline {tli} does not exist")
        if out and tli <= out[-1].tli:
            raise ValueError(f"invalid timeline history line {lineno}: timeline ids must increase ({out[-1].tli}, {tli})")
        if out and lsn < out[-1].switch_lsn:
            raise ValueError(f"invalid timeline history line {lineno}: switch point {lsn} is before {out[-1].switch_lsn}")
        out.append(TimelineSwitch(tli, lsn, parts[2].strip() if len(parts) > 2 else ""))
    return out


def timeline_of_lsn(lsn: Lsn | str | int, target_tli: int, history: Sequence[TimelineSwitch]) -> int:
    """The timeline that byte ``lsn`` belongs to on the way to ``target_tli`` (PG's ``tliOfPointInHistory``).

    A switch point belongs to the child timeline.
    """
    pos = as_lsn(lsn)
    for entry in history:
        if pos < entry.switch_lsn:
            return entry.tli
    return target_tli


def timeline_of_segment(segno: int, target_tli: int, history: Sequence[TimelineSwitch], segsize: int) -> int:
    """The timeline whose file recovery reads for segment ``segno`` (PG's ``XLogFileReadAnyTLI``).

    The segment holding a switch point is read from the child timeline: it contains a copy of the
    parent's WAL up to the switch point.
    """
    tli = target_tli
    for entry in reversed(history):
        if segno < lsn_to_segno(entry.switch_lsn, segsize):
            tli = entry.tli
        else:
            break
    return tli


class WalChain(NamedTuple):
    """Result of :func:`check_wal_continuity`.

    ``segments`` is the expected chain, from the backup's start segment to the newest archived segment on
    the target timeline's path (or the segment of ``stop_lsn`` if that is later). ``missing`` lists the
    chain members absent from the archive; ``switches`` the timeline switches crossed by the chain.
    """

    segments: list[str]
    missing: list[str]
    switches: list[TimelineSwitch]
    target_tli: int
    newest_archived: str | None = None
    ignored: tuple[str, ...] | list[str] = ()

    @property
    def first_gap(self) -> str | None:
        return self.missing[0] if self.missing else None

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def last_contiguous(self) -> str | None:
        """Last segment of the chain before the first gap (recovery can replay up to its end)."""
        if not self.missing:
            return self.segments[-1] if self.segments else None
        idx = self.segments.index(self.missing[0])
        return self.segments[idx - 1] if idx > 0 else None


def check_wal_continuity(
    archived: Iterable[str],
    histories: Mapping[int, str],
    start_lsn: Lsn | str | int,
    start_tli: int,
    target_tli: int | None = None,
    stop_lsn: Lsn | str | int | None = None,
    segsize: int = DEFAULT_SEGMENT_SIZE,
) -> WalChain:
    """Check that the archive holds every segment recovery needs from a backup's start.

    ``archived`` are archive file names (anything that is not a complete segment is ignored),
    ``histories`` maps timeline ids to the contents of their ``.history`` files, ``target_tli`` is the
    timeline to recover along (None: the newest timeline with a history file, or ``start_tli``).
    ``stop_lsn`` (the backup's stop location) makes the chain reach at least that far.
    Raises ValueError when the target timeline's history is missing or does not contain the start point.
    """
    start = as_lsn(start_lsn)
    _check_tli(start_tli)
    if target_tli is None:
        target_tli = max([start_tli, *histories])
    _check_tli(target_tli)
    if target_tli < start_tli:
        raise ValueError(f"target timeline {target_tli} is older than the backup's timeline {start_tli}")
    history: list[TimelineSwitch] = []
    if target_tli != start_tli:
        if target_tli not in histories:
            raise ValueError(f"history file {history_file_name(target_tli)} is missing: cannot follow timeline {target_tli}")
        history = parse_history(histories[target_tli])
    if timeline_of_lsn(start, target_tli, history) != start_tli:
        raise ValueError(f"backup start {start} on timeline {start_tli} is not on the history of timeline {target_tli}")

    start_segno = lsn_to_segno(start, segsize)
    present: set[tuple[int, int]] = set()
    ignored: list[str] = []
    newest: int | None = None
    for name in archived:
        info = classify_archive_name(name, segsize)
        if info.kind is not WalFileKind.SEGMENT:
            continue
        tli, segno = parse_segment_name(name, segsize)
        if timeline_of_segment(segno, target_tli, history, segsize) != tli:
            ignored.append(name)  # another branch, or a parent's segment superseded by the child's copy
            continue
        present.add((tli, segno))
        if segno >= start_segno and (newest is None or segno > newest):
            newest = segno

    last = start_segno if newest is None else newest
    if stop_lsn is not None:
        last = max(last, lsn_to_segno(stop_lsn, segsize))
    chain: list[str] = []
    missing: list[str] = []
    for segno in range(start_segno, last + 1):
        tli = timeline_of_segment(segno, target_tli, history, segsize)
        name = segment_name(tli, segno, segsize)
        chain.append(name)
        if (tli, segno) not in present:
            missing.append(name)
    end_lsn = Lsn((last + 1) * segsize)
    switches = [s for s in history if s.tli >= start_tli and s.switch_lsn <= end_lsn]
    return WalChain(
        segments=chain,
        missing=missing,
        switches=switches,
        target_tli=target_tli,
        newest_archived=None
        if newest is None
        else segment_name(timeline_of_segment(newest, target_tli, history, segsize), newest, segsize),
        ignored=sorted(ignored),
    )


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


# ---------------------------------------------------------------------------------
# backup_label
# ---------------------------------------------------------------------------------
class BackupLabel(TypedDict):
    start_wal_lsn: Lsn
    start_wal_file: str
    checkpoint_lsn: Lsn
    start_timeline: int | None
    label: str | None
    start_time: datetime | None
    start_time_text: str | None
    backup_method: str | None
    backup_from: str | None


_START_WAL_RE = r"^(\S+) \(file ([0-9A-F]{24})\)$"
_START_TIME_RE = r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?: (\S+))?$"
_TZ_OFFSET_RE = r"^([+-])(\d{2})(?::?(\d{2}))?$"


def _parse_label_time(text: str) -> datetime | None:
    """``2026-11-25 01:45:35 UTC`` -> aware datetime; None when the zone is an abbreviation we can't resolve."""
    m = re.match(_START_TIME_RE, text)
    if not m:
        return None
    from datetime import UTC, datetime, timedelta, timezone  # here: wal-push's path never parses labels

    naive = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    zone = m.group(2)
    if zone in ("UTC", "GMT", "Z", "UCT", "Etc/UTC"):
        return naive.replace(tzinfo=UTC)
    if zone is None:
        return None
    off = re.match(_TZ_OFFSET_RE, zone)
    if not off:
        return None
    delta = timedelta(hours=int(off.group(2)), minutes=int(off.group(3) or 0))
    return naive.replace(tzinfo=timezone(-delta if off.group(1) == "-" else delta))


def parse_backup_label(text: str) -> BackupLabel:
    """Parse a ``backup_label`` file (as written by ``pg_backup_stop`` / ``pg_basebackup``)."""
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        if not raw.strip():
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            raise ValueError(f"invalid backup_label line {raw!r}: expected 'KEY: value'")
        fields.setdefault(key.strip(), value.strip())
    if "START WAL LOCATION" not in fields:
        raise ValueError("invalid backup_label: missing START WAL LOCATION")
    if "CHECKPOINT LOCATION" not in fields:
        raise ValueError("invalid backup_label: missing CHECKPOINT LOCATION")
    m = re.match(_START_WAL_RE, fields["START WAL LOCATION"])
    if not m:
        raise ValueError(
            f"invalid backup_label START WAL LOCATION {fields['START WAL LOCATION']!r}: expected 'X/X (file 000000010000000000000002)'"
        )
    start_lsn = Lsn.parse(m.group(1))
    start_file = m.group(2)
    file_tli = int(start_file[:8], 16)
    checkpoint = Lsn.parse(fields["CHECKPOINT LOCATION"])
    tli: int | None = None
    if "START TIMELINE" in fields:
        try:
            tli = int(fields["START TIMELINE"])
        except ValueError:
            raise ValueError(f"invalid backup_label START TIMELINE {fields['START TIMELINE']!r}") from None
        if tli != file_tli:
            raise ValueError(f"invalid backup_label: START TIMELINE {tli} does not match the start WAL file {start_file}")
    if checkpoint < start_lsn:
        raise ValueError(f"invalid backup_label: CHECKPOINT LOCATION {checkpoint} is before START WAL LOCATION {start_lsn}")
    time_text = fields.get("START TIME")
    return BackupLabel(
        start_wal_lsn=start_lsn,
        start_wal_file=start_file,
        checkpoint_lsn=checkpoint,
        start_timeline=tli,
        label=fields.get("LABEL"),
        start_time=_parse_label_time(time_text) if time_text else None,
        start_time_text=time_text,
        backup_method=fields.get("BACKUP METHOD"),
        backup_from=fields.get("BACKUP FROM"),
    )
