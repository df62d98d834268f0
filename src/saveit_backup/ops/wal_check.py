"""WAL continuity of the archive, from each physical backup's start to the newest archived segment.

Uses ``domain.timeline.check_wal_continuity`` (timeline switches followed through ``.history`` files).
The point-in-time window runs from the oldest good physical backup's end to the newest segment
archived without a gap after the newest backup (its upload time; the end of that segment is the
last point recovery can reach).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from saveit_backup.domain.manifest import Manifest, iso
from saveit_backup.domain.timeline import check_wal_continuity
from saveit_backup.domain.wal import DEFAULT_SEGMENT_SIZE, WalFileKind, classify_archive_name
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository


def archived(repo: Repository) -> tuple[dict[str, float | None], dict[int, str]]:
    """(archive file name -> upload time, timeline -> .history contents)."""
    names: dict[str, float | None] = {}
    histories: dict[int, str] = {}
    for info in repo.storage.list(layout.WAL):
        name = info.key.rsplit("/", 1)[1]
        names[name] = info.mtime
        kind = classify_archive_name(name)
        if kind.kind is WalFileKind.HISTORY and kind.tli is not None:
            histories[kind.tli] = b"".join(repo.read_object(info.key)).decode()
    return names, histories


def wal_report(repo: Repository, manifests: list[Manifest]) -> dict[str, Any]:
    physical = [m for m in manifests if m.type in ("full", "diff", "incr") and m.physical.get("start_lsn")]
    lines: list[str] = []
    problems: list[str] = []
    if not physical:
        return {"lines": ["WAL: no physical backup to check continuity from"], "problems": [], "pitr_window": None}
    names, histories = archived(repo)
    segments = [n for n in names if classify_archive_name(n).kind is WalFileKind.SEGMENT]
    lines.append(f"WAL archive: {len(segments)} segment(s), {len(histories)} timeline history file(s)")
    latest_end: float | None = None
    for m in physical:
        p = m.physical
        segsize = int(p.get("segment_size") or DEFAULT_SEGMENT_SIZE)
        tli = int(p["timeline"])
        try:
            chain = check_wal_continuity(segments, histories, p["start_lsn"], tli, None, p["stop_lsn"], segsize)
        except ValueError:
            # The newest timeline branched off before this backup: follow the backup's own timeline.
            chain = check_wal_continuity(segments, histories, p["start_lsn"], tli, tli, p["stop_lsn"], segsize)
        in_backup = set(p.get("wal", [])) if p.get("wal_in_backup") else set()
        missing = [s for s in chain.missing if s not in in_backup]
        path = " -> ".join(str(t) for t in sorted({tli, *(s.tli + 1 for s in chain.switches)} | {chain.target_tli}))
        if missing:
            problems.append(f"{m.id}: WAL gap at {missing[0]} ({len(missing)} segment(s) missing); "
                            f"recovery from this backup stops at the end of {chain.last_contiguous or '-'}")
            lines.append(f"{m.id}: WAL {chain.segments[0]}..{chain.segments[-1]} (timelines {path}): "
                         f"GAP at {missing[0]}, {len(missing)} missing")
        else:
            lines.append(f"{m.id}: WAL {chain.segments[0]}..{chain.segments[-1]} (timelines {path}): continuous, "
                         f"{len(chain.segments)} segment(s)")
            newest = chain.newest_archived
            if newest and names.get(newest) is not None:
                mt = names[newest]
                latest_end = mt if latest_end is None or (mt is not None and mt > latest_end) else latest_end
    good = [m for m in physical if m.checksum_ok]
    window = None
    if good:
        earliest = min(m.finished_at for m in good)
        latest = datetime.fromtimestamp(latest_end, UTC) if latest_end is not None else max(m.finished_at for m in good)
        window = {"earliest": iso(earliest), "latest": iso(max(latest, earliest))}
        lines.append(f"point-in-time window: {window['earliest']} .. {window['latest']}")
    return {"lines": lines, "problems": problems, "pitr_window": window}
