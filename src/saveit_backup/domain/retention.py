"""Retention planning: which backups and WAL segments to keep or delete, and why (pure, no I/O).

``plan(backups, policy, now, wal)`` looks only at its arguments. The rules, in order:

1. Every backup gets a verdict from its own rules: pinned; newest good backup; within the age window of
   its kind; among the ``keep_count`` newest good full/logical backups; selected by keep-daily /
   keep-weekly / keep-monthly. A failed backup (``good=False``), or one whose parent chain is broken
   (a parent missing or failed), is deleted once a newer good backup exists, and kept otherwise.
2. Keeping a backup keeps every backup it depends on (``parent_id``, transitively), so a kept
   diff/incr keeps its full even past the full's age window. Consequently no kept backup is an orphan:
   a diff/incr whose parent is deleted has itself been deleted.
3. WAL: continuous WAL is kept from the start of the *anchor*, the newest kept good physical backup that
   started at or before ``now - wal_days`` (or the oldest kept physical backup if none is that old), so any
   point in the window can be recovered. Older kept physical backups keep the WAL from their start to their
   stop segment, which they need to become consistent.

Ages and GFS periods are measured from ``started``; GFS days/weeks/months are taken in ``now``'s time zone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, NamedTuple

BackupKind = Literal["full", "diff", "incr", "logical"]
KINDS: tuple[str, ...] = ("full", "diff", "incr", "logical")
PHYSICAL_KINDS: tuple[str, ...] = ("full", "diff", "incr")

_SEGMENT_RE = re.compile(r"^[0-9A-F]{24}")


@dataclass(frozen=True)
class BackupRecord:
    id: str
    kind: BackupKind
    started: datetime
    finished: datetime
    good: bool = True
    parent_id: str | None = None
    pinned: bool = False
    start_wal: str | None = None
    stop_wal: str | None = None
    timeline: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backup {self.id}: unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        if self.kind in ("diff", "incr") and not self.parent_id:
            raise ValueError(f"backup {self.id}: a {self.kind} backup needs a parent_id")
        if self.parent_id == self.id:
            raise ValueError(f"backup {self.id}: a backup cannot be its own parent")
        for label, name in (("start_wal", self.start_wal), ("stop_wal", self.stop_wal)):
            if name is not None and not _SEGMENT_RE.match(name):
                raise ValueError(f"backup {self.id}: {label} {name!r} is not a WAL segment name")

    @property
    def physical(self) -> bool:
        return self.kind in PHYSICAL_KINDS

    @property
    def wal_timeline(self) -> int | None:
        if self.timeline is not None:
            return self.timeline
        return int(self.start_wal[:8], 16) if self.start_wal else None


@dataclass(frozen=True)
class WalRecord:
    """An archived WAL file (segment, ``.partial``, ``.backup`` or ``.history``), by name."""

    name: str


@dataclass(frozen=True)
class RetentionPolicy:
    """Age windows in days (None: no age limit), counts (None: rule off)."""

    full_days: int | None = 30
    incremental_days: int | None = 7
    logical_days: int | None = 30
    keep_count: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    wal_days: int | None = 7

    def __post_init__(self) -> None:
        for name in (
            "full_days",
            "incremental_days",
            "logical_days",
            "keep_count",
            "keep_daily",
            "keep_weekly",
            "keep_monthly",
            "wal_days",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"retention setting {name} must be a non-negative integer, not {value!r}")

    def days_for(self, kind: str) -> tuple[int | None, str]:
        if kind == "full":
            return self.full_days, "full"
        if kind in ("diff", "incr"):
            return self.incremental_days, "incremental"
        return self.logical_days, "logical"


class Decision(NamedTuple):
    id: str
    reason: str


@dataclass
class RetentionPlan:
    """``keep``/``delete`` are sorted by start time. WAL of timeline T may be deleted when its segment part
    is before ``wal_delete_before[T]`` (None: keep all of T) and it is not inside a ``wal_protected`` range;
    ``wal_delete`` applies exactly that to the WAL records given to :func:`plan`."""

    keep: list[Decision] = field(default_factory=list)
    delete: list[Decision] = field(default_factory=list)
    wal_delete_before: dict[int, str | None] = field(default_factory=dict)
    wal_reasons: dict[int, str] = field(default_factory=dict)
    wal_protected: list[tuple[str, str | None]] = field(default_factory=list)
    wal_delete: list[str] = field(default_factory=list)

    @property
    def keep_ids(self) -> list[str]:
        return [d.id for d in self.keep]

    @property
    def delete_ids(self) -> list[str]:
        return [d.id for d in self.delete]

    def wal_deletable(self, name: str) -> bool:
        return wal_deletable(name, self.wal_delete_before, self.wal_protected)


def _fmt_age(age: timedelta) -> str:
    if age < timedelta(0):
        return "0d (in the future)"
    hours = age.seconds // 3600
    if age.days == 0:
        return f"{hours}h"
    return f"{age.days}d" if hours == 0 else f"{age.days}d {hours}h"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _gfs(candidates: Sequence[BackupRecord], count: int | None, rule: str, period: str, now: datetime) -> dict[str, str]:
    """Newest backup of each of the last ``count`` periods that have one."""
    if not count:
        return {}
    chosen: dict[str, str] = {}
    seen: list[str] = []
    for b in sorted(candidates, key=lambda r: (r.started, r.id), reverse=True):
        local = b.started.astimezone(now.tzinfo) if b.started.tzinfo and now.tzinfo else b.started
        if period == "day":
            key = local.date().isoformat()
        elif period == "week":
            iso = local.isocalendar()
            key = f"{iso.year}-W{iso.week:02d}"
        else:
            key = f"{local.year}-{local.month:02d}"
        if key in seen:
            continue
        if len(seen) >= count:
            break
        seen.append(key)
        chosen[b.id] = f"{rule} {key}"
    return chosen


def wal_deletable(name: str, delete_before: dict[int, str | None], protected: Iterable[tuple[str, str | None]] = ()) -> bool:
    """Whether an archived WAL file may be deleted under a plan's WAL boundaries. History files never are."""
    if not _SEGMENT_RE.match(name) or name.endswith(".history"):
        return False
    seg = name[:24]
    tli = int(seg[:8], 16)
    boundary = delete_before.get(tli)
    if boundary is None or seg[8:] >= boundary[8:]:
        return False
    return not any(seg[:8] == start[:8] and seg[8:] >= start[8:] and (stop is None or seg[8:] <= stop[8:]) for start, stop in protected)


def plan(
    backups: Sequence[BackupRecord],
    policy: RetentionPolicy,
    now: datetime,
    wal: Sequence[WalRecord] = (),
) -> RetentionPlan:
    """Decide what to keep and delete. Never deletes the newest good backup, a pinned backup, or a backup
    a kept backup depends on."""
    by_id: dict[str, BackupRecord] = {}
    for b in backups:
        if b.id in by_id:
            raise ValueError(f"duplicate backup id {b.id}")
        by_id[b.id] = b
    order = sorted(backups, key=lambda r: (r.started, r.id))

    # A backup is restorable when it and all its ancestors exist and are good.
    broken: dict[str, str] = {}
    for b in order:
        seen = {b.id}
        cur = b
        while cur.parent_id is not None:
            parent = by_id.get(cur.parent_id)
            if parent is None:
                broken[b.id] = f"parent {cur.parent_id} is missing"
                break
            if parent.id in seen:
                broken[b.id] = f"parent chain of {b.id} loops through {parent.id}"
                break
            if not parent.good:
                broken[b.id] = f"depends on failed backup {parent.id}"
                break
            seen.add(parent.id)
            cur = parent
    restorable = [b for b in order if b.good and b.id not in broken]
    newest_good = restorable[-1] if restorable else None

    keep: dict[str, list[str]] = {}
    delete: dict[str, str] = {}

    def add_keep(bid: str, reason: str) -> None:
        keep.setdefault(bid, []).append(reason)

    for b in order:
        if b.pinned:
            add_keep(b.id, "pinned")
    if newest_good is not None:
        add_keep(newest_good.id, "newest good backup")

    full_or_logical = [b for b in restorable if b.kind in ("full", "logical")]
    if policy.keep_count:
        newest_first = list(reversed(full_or_logical))
        for i, b in enumerate(newest_first[: policy.keep_count], start=1):
            add_keep(b.id, f"keep-count: {_ordinal(i)} newest of {policy.keep_count} full/logical")
    for rule, count, period in (
        ("keep-daily", policy.keep_daily, "day"),
        ("keep-weekly", policy.keep_weekly, "week"),
        ("keep-monthly", policy.keep_monthly, "month"),
    ):
        for bid, reason in _gfs(full_or_logical, count, rule, period, now).items():
            add_keep(bid, reason)

    for b in order:
        if not b.good or b.id in broken:
            what = "failed backup" if not b.good else f"unrestorable backup ({broken[b.id]})"
            newer = [r for r in restorable if (r.started, r.id) > (b.started, b.id)]
            if newer:
                delete[b.id] = f"{what}; newer good backup {newer[0].id} exists"
            else:
                add_keep(b.id, f"{what} kept: no newer good backup yet")
            continue
        days, label = policy.days_for(b.kind)
        age = now - b.started
        if days is None:
            add_keep(b.id, f"no age limit for {label} backups")
        elif age <= timedelta(days=days):
            add_keep(b.id, f"age {_fmt_age(age)} <= {days}d {label} retention")
        else:
            delete[b.id] = f"age {_fmt_age(age)} > {days}d {label} retention"

    # Dependencies: a kept backup keeps its ancestors (newest dependant first so the reason names the
    # closest kept child).
    for b in reversed(order):
        if b.id not in keep:
            continue
        cur, walked = b, {b.id}
        while cur.parent_id is not None and cur.parent_id in by_id and cur.parent_id not in walked:
            parent = by_id[cur.parent_id]
            reason = f"needed by kept backup {cur.id}"
            if reason not in keep.get(parent.id, []):
                add_keep(parent.id, reason)
            walked.add(parent.id)
            cur = parent

    result = RetentionPlan()
    for b in order:
        if b.id in keep:
            result.keep.append(Decision(b.id, "; ".join(keep[b.id])))
        else:
            result.delete.append(Decision(b.id, delete.get(b.id, "not selected by any keep rule")))

    _plan_wal(result, [by_id[d.id] for d in result.keep], policy, now, wal)
    return result


def _plan_wal(
    result: RetentionPlan,
    kept: Sequence[BackupRecord],
    policy: RetentionPolicy,
    now: datetime,
    wal: Sequence[WalRecord],
) -> None:
    timelines: set[int] = set()
    for w in wal:
        if _SEGMENT_RE.match(w.name):
            timelines.add(int(w.name[:8], 16))
    physical = [b for b in kept if b.physical]
    for b in physical:
        if b.wal_timeline is not None:
            timelines.add(b.wal_timeline)

    def no_delete(reason: str) -> None:
        for tli in sorted(timelines):
            result.wal_delete_before[tli] = None
            result.wal_reasons[tli] = reason

    if policy.wal_days is None:
        no_delete("no WAL age limit")
        return
    if not physical:
        no_delete("no kept physical backup: WAL retention needs a base backup to anchor on")
        return

    cutoff = now - timedelta(days=policy.wal_days)
    good = [b for b in physical if b.good]
    old_enough = [b for b in good if b.started <= cutoff]
    if old_enough:
        anchor = old_enough[-1]
        why = f"start of {anchor.id}, newest kept good physical backup started before the {policy.wal_days}d WAL window"
    else:
        anchor = physical[0]
        why = f"start of {anchor.id}, oldest kept physical backup (none is older than the {policy.wal_days}d WAL window)"
    if anchor.start_wal is None:
        no_delete(f"kept backup {anchor.id} has no start WAL recorded")
        return

    # Recovery from the anchor or any newer kept backup never reads a segment numbered below its start.
    later = [b for b in physical if (b.started, b.id) >= (anchor.started, anchor.id) and b.start_wal]
    low = min(b.start_wal[8:24] for b in later if b.start_wal)
    for tli in sorted(timelines):
        result.wal_delete_before[tli] = f"{tli:08X}{low}"
        result.wal_reasons[tli] = why
    for b in physical:
        if (b.started, b.id) < (anchor.started, anchor.id) and b.start_wal:
            result.wal_protected.append((b.start_wal[:24], b.stop_wal[:24] if b.stop_wal else None))
    result.wal_delete = sorted(w.name for w in wal if wal_deletable(w.name, result.wal_delete_before, result.wal_protected))
