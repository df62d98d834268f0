"""Timelines (``.history`` files), the WAL archive's continuity and ``backup_label`` (pure, no I/O).

What restores, ``verify`` and backups need beyond ``domain.wal`` (LSNs, segment names and headers);
kept apart because ``wal-push`` imports ``domain.wal`` once per WAL file, and the named tuples and
typed dict here cost it about a millisecond to build.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypedDict

from saveit_backup.domain.wal import (
    DEFAULT_SEGMENT_SIZE,
    Lsn,
    WalFileKind,
    as_lsn,
    check_timeline,
    classify_archive_name,
    history_file_name,
    lsn_to_segno,
    parse_segment_name,
    segment_name,
)

if TYPE_CHECKING:
    from datetime import datetime


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
    check_timeline(start_tli)
    if target_tli is None:
        target_tli = max([start_tli, *histories])
    check_timeline(target_tli)
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
