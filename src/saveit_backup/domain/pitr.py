"""Point-in-time recovery planning: pick the base backup for a target, write the recovery settings (pure).

``choose_backup(backups, target)`` picks the newest good physical backup that can reach the target;
``recovery_settings(target, restore_command, timeline, action)`` returns the ``postgresql.conf`` settings
(values already quoted) that make PostgreSQL (12+) stop there; ``render_conf`` turns them into lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from saveit_backup.domain.timeline import TimelineSwitch, timeline_of_lsn
from saveit_backup.domain.wal import Lsn, as_lsn

TargetKind = Literal["time", "lsn", "xid", "name", "immediate", "latest"]
RecoveryAction = Literal["pause", "promote", "shutdown"]
PHYSICAL_KINDS: tuple[str, ...] = ("full", "diff", "incr")
MAX_RESTORE_POINT_NAME = 63  # MAXFNAMELEN - 1


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops. Build with the class methods, e.g. ``RecoveryTarget.at_time(ts)``."""

    kind: TargetKind
    time: datetime | None = None
    lsn: Lsn | None = None
    xid: int | None = None
    name: str | None = None
    inclusive: bool = True

    def __post_init__(self) -> None:
        if self.kind == "time":
            if self.time is None:
                raise ValueError("a time recovery target needs a time")
            if self.time.tzinfo is None or self.time.utcoffset() is None:
                raise ValueError(f"recovery target time {self.time.isoformat()} has no time zone; give one, e.g. +00:00")
        elif self.kind == "lsn":
            if self.lsn is None:
                raise ValueError("an lsn recovery target needs an LSN")
        elif self.kind == "xid":
            if self.xid is None or isinstance(self.xid, bool) or not 3 <= self.xid <= 0xFFFF_FFFF_FFFF_FFFF:
                raise ValueError(f"invalid recovery target xid {self.xid!r}: must be a normal transaction id (>= 3)")
        elif self.kind == "name":
            if not self.name:
                raise ValueError("a named recovery target needs a restore point name")
            if len(self.name.encode()) > MAX_RESTORE_POINT_NAME:
                raise ValueError(f"restore point name {self.name!r} is longer than {MAX_RESTORE_POINT_NAME} bytes")
        elif self.kind not in ("immediate", "latest"):
            raise ValueError(f"unknown recovery target kind {self.kind!r}")

    @classmethod
    def at_time(cls, when: datetime, inclusive: bool = True) -> RecoveryTarget:
        return cls("time", time=when, inclusive=inclusive)

    @classmethod
    def at_lsn(cls, lsn: Lsn | str | int, inclusive: bool = True) -> RecoveryTarget:
        return cls("lsn", lsn=as_lsn(lsn), inclusive=inclusive)

    @classmethod
    def at_xid(cls, xid: int, inclusive: bool = True) -> RecoveryTarget:
        return cls("xid", xid=xid, inclusive=inclusive)

    @classmethod
    def at_name(cls, name: str) -> RecoveryTarget:
        return cls("name", name=name)

    @classmethod
    def immediate(cls) -> RecoveryTarget:
        return cls("immediate")

    @classmethod
    def latest(cls) -> RecoveryTarget:
        return cls("latest")

    def describe(self) -> str:
        if self.kind == "time" and self.time is not None:
            return f"time {self.time.isoformat(sep=' ')}"
        if self.kind == "lsn":
            return f"LSN {self.lsn}"
        if self.kind == "xid":
            return f"xid {self.xid}"
        if self.kind == "name":
            return f"restore point {self.name!r}"
        return "end of the backup (immediate)" if self.kind == "immediate" else "end of the archived WAL (latest)"


@dataclass(frozen=True)
class PhysicalBackup:
    id: str
    kind: str
    started: datetime
    finished: datetime
    start_lsn: Lsn
    stop_lsn: Lsn
    timeline: int
    good: bool = True


def choose_backup(
    backups: Sequence[PhysicalBackup],
    target: RecoveryTarget,
    target_timeline: int | None = None,
    history: Sequence[TimelineSwitch] = (),
) -> PhysicalBackup:
    """The newest good physical backup that can reach ``target``.

    time: finished strictly before the target time; lsn: ``stop_lsn <= target``; xid, name, immediate,
    latest: the newest good one (whether the xid or name lies after it is only known by replaying WAL).
    With ``target_timeline`` and its ``history`` (from :func:`saveit_backup.domain.timeline.parse_history`),
    backups on branches that the target timeline does not descend from are skipped.
    Raises ValueError saying why nothing qualifies.
    """
    candidates = [b for b in backups if b.kind in PHYSICAL_KINDS]
    if not candidates:
        raise ValueError("no physical backup exists: point-in-time recovery needs a full, diff or incr backup")
    good = [b for b in candidates if b.good]
    if not good:
        raise ValueError(f"no good physical backup: all {len(candidates)} physical backups failed verification")
    if target_timeline is not None:
        on_path = [
            b
            for b in good
            if timeline_of_lsn(b.start_lsn, target_timeline, history) == b.timeline
            and timeline_of_lsn(b.stop_lsn, target_timeline, history) == b.timeline
        ]
        if not on_path:
            raise ValueError(f"no good physical backup lies on the history of timeline {target_timeline}")
        good = on_path
    if target.kind == "time":
        assert target.time is not None
        when = target.time
        eligible = [b for b in good if b.finished < when]
        if not eligible:
            oldest = min(good, key=lambda b: b.finished)
            raise ValueError(
                f"no good physical backup finished before {when.isoformat(sep=' ')}; "
                f"the oldest, {oldest.id}, finished at {oldest.finished.isoformat(sep=' ')}"
            )
    elif target.kind == "lsn":
        assert target.lsn is not None
        lsn = target.lsn
        eligible = [b for b in good if b.stop_lsn <= lsn]
        if not eligible:
            lowest = min(good, key=lambda b: b.stop_lsn)
            raise ValueError(f"no good physical backup ends at or before LSN {lsn}; the earliest, {lowest.id}, ends at {lowest.stop_lsn}")
        return max(eligible, key=lambda b: (b.stop_lsn, b.finished, b.id))
    else:
        eligible = good
    return max(eligible, key=lambda b: (b.finished, b.stop_lsn, b.id))


def quote_conf_value(value: str) -> str:
    """Quote a string for postgresql.conf: single quotes doubled, backslashes escaped (the GUC file
    lexer treats ``\\`` as an escape). Newlines cannot be represented and are refused."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"setting value {value!r} contains a line break or NUL, which postgresql.conf cannot hold")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def recovery_settings(
    target: RecoveryTarget,
    restore_command: str,
    timeline: int | str | None = "latest",
    action: RecoveryAction = "pause",
) -> dict[str, str]:
    """postgresql.conf settings for recovery to ``target``; values are quoted, ready for ``name = value``.

    ``timeline`` is ``'latest'``, ``'current'``, a timeline id, or None to leave the server default.
    ``action`` is what the server does on reaching the target (ignored by PostgreSQL for 'latest').
    """
    if not restore_command.strip():
        raise ValueError("restore_command is empty")
    if action not in ("pause", "promote", "shutdown"):
        raise ValueError(f"invalid recovery target action {action!r}: use pause, promote or shutdown")
    out: dict[str, str] = {"restore_command": quote_conf_value(restore_command)}
    if target.kind == "time":
        assert target.time is not None
        out["recovery_target_time"] = quote_conf_value(target.time.isoformat(sep=" "))
    elif target.kind == "lsn":
        out["recovery_target_lsn"] = quote_conf_value(str(target.lsn))
    elif target.kind == "xid":
        out["recovery_target_xid"] = quote_conf_value(str(target.xid))
    elif target.kind == "name":
        assert target.name is not None
        out["recovery_target_name"] = quote_conf_value(target.name)
    elif target.kind == "immediate":
        out["recovery_target"] = quote_conf_value("immediate")
    if target.kind in ("time", "lsn", "xid") and not target.inclusive:
        out["recovery_target_inclusive"] = quote_conf_value("off")
    if timeline is not None:
        if isinstance(timeline, int) and not isinstance(timeline, bool):
            if timeline < 1:
                raise ValueError(f"invalid recovery target timeline {timeline}: timelines start at 1")
            out["recovery_target_timeline"] = quote_conf_value(str(timeline))
        elif timeline in ("latest", "current"):
            out["recovery_target_timeline"] = quote_conf_value(timeline)
        elif isinstance(timeline, str) and timeline.isdigit() and int(timeline) >= 1:
            out["recovery_target_timeline"] = quote_conf_value(str(int(timeline)))
        else:
            raise ValueError(f"invalid recovery target timeline {timeline!r}: use 'latest', 'current' or a number")
    out["recovery_target_action"] = quote_conf_value(action)
    return out


def render_conf(settings: Mapping[str, str]) -> str:
    """``name = value`` lines, in the mapping's order, for postgresql.auto.conf."""
    return "".join(f"{name} = {value}\n" for name, value in settings.items())
