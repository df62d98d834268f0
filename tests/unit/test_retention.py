"""Table tests for saveit_backup.domain.retention.plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from saveit_backup.domain.retention import (
    BackupRecord,
    RetentionPlan,
    RetentionPolicy,
    WalRecord,
    plan,
    wal_deletable,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LETTER = {"full": "F", "diff": "D", "incr": "I", "logical": "L"}


def bk(
    kind: str,
    age: float,
    *,
    parent: str | None = None,
    good: bool = True,
    pinned: bool = False,
    seg: int | None = None,
    segs: int = 1,
    tli: int = 1,
) -> BackupRecord:
    """A backup that started ``age`` days before NOW; id like the real ones (20261124-120000F)."""
    started = NOW - timedelta(days=age)
    bid = started.strftime("%Y%m%d-%H%M%S") + LETTER[kind]
    start_wal = stop_wal = None
    if seg is not None:
        start_wal = f"{tli:08X}{seg // 256:08X}{seg % 256:08X}"
        stop = seg + segs - 1
        stop_wal = f"{tli:08X}{stop // 256:08X}{stop % 256:08X}"
    return BackupRecord(
        id=bid,
        kind=kind,  # type: ignore[arg-type]
        started=started,
        finished=started + timedelta(minutes=20),
        good=good,
        parent_id=parent,
        pinned=pinned,
        start_wal=start_wal,
        stop_wal=stop_wal,
        timeline=tli if seg is not None else None,
    )


def ids(days: float, kind: str) -> str:
    return (NOW - timedelta(days=days)).strftime("%Y%m%d-%H%M%S") + LETTER[kind]


F = "full"
D = "diff"
I = "incr"  # noqa: E741
L = "logical"

# Each case: backups, policy, expected {id: (verdict, reason substring)} for every backup.
CASES: dict[str, tuple[list[BackupRecord], RetentionPolicy, dict[str, tuple[str, str]]]] = {
    "age per kind": (
        [
            bk(F, 40),
            bk(F, 31),
            bk(F, 29),
            bk(D, 8, parent=ids(29, F)),
            bk(I, 6.5, parent=ids(8, D)),
            bk(L, 31),
            bk(L, 30),
            bk(L, 2),
        ],
        RetentionPolicy(),
        {
            ids(40, F): ("delete", "age 40d > 30d full retention"),
            ids(31, F): ("delete", "age 31d > 30d full retention"),
            ids(29, F): ("keep", "age 29d <= 30d full retention"),
            ids(8, D): ("keep", "needed by kept backup " + ids(6.5, I)),
            ids(6.5, I): ("keep", "age 6d 12h <= 7d incremental retention"),
            ids(31, L): ("delete", "age 31d > 30d logical retention"),
            ids(30, L): ("keep", "age 30d <= 30d logical retention"),
            ids(2, L): ("keep", "newest good backup"),
        },
    ),
    "diff past its window is deleted": (
        [bk(F, 20), bk(D, 8, parent=ids(20, F)), bk(F, 1)],
        RetentionPolicy(),
        {
            ids(20, F): ("keep", "age 20d <= 30d"),
            ids(8, D): ("delete", "age 8d > 7d incremental retention"),
            ids(1, F): ("keep", "newest good backup"),
        },
    ),
    "everything old: newest good survives": (
        [bk(F, 100), bk(L, 95), bk(F, 90)],
        RetentionPolicy(),
        {
            ids(100, F): ("delete", "age 100d > 30d full retention"),
            ids(95, L): ("delete", "age 95d > 30d logical retention"),
            ids(90, F): ("keep", "newest good backup"),
        },
    ),
    "newest good is an old incr: its chain survives": (
        [bk(F, 60), bk(I, 50, parent=ids(60, F)), bk(F, 45, good=False)],
        RetentionPolicy(),
        {
            ids(60, F): ("keep", "needed by kept backup " + ids(50, I)),
            ids(50, I): ("keep", "newest good backup"),
            ids(45, F): ("keep", "failed backup kept: no newer good backup yet"),
        },
    ),
    "keep_count": (
        [bk(F, 90), bk(L, 80), bk(F, 70), bk(F, 60, good=False), bk(L, 50)],
        RetentionPolicy(keep_count=3),
        {
            ids(90, F): ("delete", "age 90d > 30d"),
            ids(80, L): ("keep", "keep-count: 3rd newest of 3"),
            ids(70, F): ("keep", "keep-count: 2nd newest of 3"),
            ids(60, F): ("delete", "failed backup; newer good backup " + ids(50, L) + " exists"),
            ids(50, L): ("keep", "keep-count: 1st newest of 3"),
        },
    ),
    "keep_count ignores diff and incr": (
        [bk(F, 50), bk(D, 40, parent=ids(50, F)), bk(I, 35, parent=ids(40, D)), bk(F, 33)],
        RetentionPolicy(keep_count=2),
        {
            ids(50, F): ("keep", "keep-count: 2nd"),
            ids(40, D): ("delete", "age 40d > 7d incremental"),
            ids(35, I): ("delete", "age 35d > 7d incremental"),
            ids(33, F): ("keep", "newest good backup"),
        },
    ),
    "pinned": (
        [bk(F, 400, pinned=True), bk(F, 200), bk(L, 100, pinned=True, good=False), bk(F, 3)],
        RetentionPolicy(),
        {
            ids(400, F): ("keep", "pinned"),
            ids(200, F): ("delete", "age 200d > 30d"),
            ids(100, L): ("keep", "pinned"),
            ids(3, F): ("keep", "newest good backup"),
        },
    ),
    "pinned incr keeps its chain": (
        [bk(F, 400), bk(D, 390, parent=ids(400, F)), bk(I, 380, parent=ids(390, D), pinned=True), bk(F, 1)],
        RetentionPolicy(),
        {
            ids(400, F): ("keep", "needed by kept backup " + ids(390, D)),
            ids(390, D): ("keep", "needed by kept backup " + ids(380, I)),
            ids(380, I): ("keep", "pinned"),
            ids(1, F): ("keep", "newest good backup"),
        },
    ),
    "bad backups": (
        [bk(F, 10, good=False), bk(F, 5), bk(L, 4, good=False), bk(D, 1, parent=ids(5, F), good=False)],
        RetentionPolicy(),
        {
            ids(10, F): ("delete", "failed backup; newer good backup " + ids(5, F) + " exists"),
            ids(5, F): ("keep", "newest good backup"),
            ids(4, L): ("keep", "failed backup kept: no newer good backup yet"),
            ids(1, D): ("keep", "failed backup kept: no newer good backup yet"),
        },
    ),
    "only bad backups": (
        [bk(F, 50, good=False), bk(F, 2, good=False)],
        RetentionPolicy(),
        {
            ids(50, F): ("keep", "failed backup kept: no newer good backup yet"),
            ids(2, F): ("keep", "failed backup kept: no newer good backup yet"),
        },
    ),
    "chain crossing the boundary": (
        [
            bk(F, 35),
            bk(D, 20, parent=ids(35, F)),
            bk(I, 10, parent=ids(20, D)),
            bk(I, 5, parent=ids(10, I)),
            bk(I, 2, parent=ids(5, I)),
        ],
        RetentionPolicy(),
        {
            ids(35, F): ("keep", "needed by kept backup " + ids(20, D)),
            ids(20, D): ("keep", "needed by kept backup " + ids(10, I)),
            ids(10, I): ("keep", "needed by kept backup " + ids(5, I)),
            ids(5, I): ("keep", "age 5d <= 7d incremental retention"),
            ids(2, I): ("keep", "newest good backup"),
        },
    ),
    "orphans are never left": (
        [
            bk(F, 40),
            bk(D, 39, parent=ids(40, F)),
            bk(I, 38, parent=ids(39, D)),
            bk(F, 20),
            bk(I, 3, parent="20261001-000000F"),  # parent already gone
            bk(I, 2, parent=ids(20, F), good=False),
            bk(I, 1.5, parent=ids(2, I)),  # depends on a failed incr
            bk(F, 1),
        ],
        RetentionPolicy(),
        {
            ids(40, F): ("delete", "age 40d > 30d"),
            ids(39, D): ("delete", "age 39d > 7d"),
            ids(38, I): ("delete", "age 38d > 7d"),
            ids(20, F): ("keep", "age 20d <= 30d"),
            ids(3, I): ("delete", "unrestorable backup (parent 20261001-000000F is missing); newer good backup"),
            ids(2, I): ("delete", "failed backup; newer good backup " + ids(1, F)),
            ids(1.5, I): ("delete", f"unrestorable backup (depends on failed backup {ids(2, I)})"),
            ids(1, F): ("keep", "newest good backup"),
        },
    ),
    "GFS daily weekly monthly": (
        [
            # 2026-08-03 (Mon) .. 2026-11-25 (Wed 12:00)
            bk(F, 114.5),  # 2026-08-03 00:00, month 2026-08
            bk(F, 85.5),  # 2026-09-01 00:00
            bk(L, 70.5),  # 2026-09-16 00:00, newest of 2026-09 (logical backups count)
            bk(F, 55.5),  # 2026-10-01 00:00
            bk(F, 40.5),  # 2026-10-16 00:00, newest of 2026-10
            bk(F, 23.5),  # 2026-11-02 00:00 Mon W45
            bk(F, 18.5),  # 2026-11-07 00:00 Sat W45
            bk(L, 9.5),  # 2026-11-16 00:00 Mon W47
            bk(F, 8.5),  # 2026-11-17 00:00 Tue W47
            bk(F, 2.25),  # 2026-11-23 06:00 Mon W48
            bk(F, 2.0),  # 2026-11-23 12:00 Mon W48, same day, newer
            bk(F, 0.5),  # 2026-11-25 00:00 Wed W48
        ],
        RetentionPolicy(full_days=0, logical_days=0, keep_daily=3, keep_weekly=3, keep_monthly=3),
        {
            ids(114.5, F): ("delete", "age 114d 12h > 0d full retention"),
            ids(85.5, F): ("delete", "age 85d 12h > 0d full retention"),
            ids(70.5, L): ("keep", "keep-monthly 2026-09"),
            ids(55.5, F): ("delete", "age 55d 12h > 0d full"),
            ids(40.5, F): ("keep", "keep-monthly 2026-10"),
            ids(23.5, F): ("delete", "age 23d 12h > 0d"),
            ids(18.5, F): ("keep", "keep-weekly 2026-W45"),
            ids(9.5, L): ("delete", "age 9d 12h > 0d logical"),
            ids(8.5, F): ("keep", "keep-daily 2026-11-17; keep-weekly 2026-W47"),
            ids(2.25, F): ("delete", "age 2d 6h > 0d"),
            ids(2.0, F): ("keep", "keep-daily 2026-11-23"),
            ids(0.5, F): ("keep", "newest good backup; keep-daily 2026-11-25; keep-weekly 2026-W48; keep-monthly 2026-11"),
        },
    ),
    "GFS skips failed backups and diffs": (
        [bk(F, 3.5), bk(F, 2.5), bk(D, 2.4, parent=ids(2.5, F)), bk(F, 1.5, good=False)],
        RetentionPolicy(full_days=0, incremental_days=0, keep_daily=5),
        {
            ids(3.5, F): ("keep", "keep-daily 2026-11-22"),
            ids(2.5, F): ("keep", "keep-daily 2026-11-23; needed by kept backup " + ids(2.4, D)),
            ids(2.4, D): ("keep", "newest good backup"),
            ids(1.5, F): ("keep", "failed backup kept: no newer good backup yet"),
        },
    ),
    "no age limit": (
        [bk(F, 1000), bk(F, 999)],
        RetentionPolicy(full_days=None),
        {
            ids(1000, F): ("keep", "no age limit for full backups"),
            ids(999, F): ("keep", "newest good backup"),
        },
    ),
}


@pytest.mark.parametrize(("backups", "policy", "expected"), list(CASES.values()), ids=list(CASES))
def test_plan(backups: list[BackupRecord], policy: RetentionPolicy, expected: dict[str, tuple[str, str]]) -> None:
    result = plan(backups, policy, NOW)
    verdicts = {d.id: ("keep", d.reason) for d in result.keep} | {d.id: ("delete", d.reason) for d in result.delete}
    assert set(verdicts) == set(expected), "every backup gets exactly one verdict"
    assert len(result.keep) + len(result.delete) == len(backups)
    for bid, (verdict, reason) in expected.items():
        got_verdict, got_reason = verdicts[bid]
        assert got_verdict == verdict, f"{bid}: {got_verdict} ({got_reason})"
        assert reason in got_reason, f"{bid}: {got_reason!r} lacks {reason!r}"
    _check_invariants(backups, result)


def _check_invariants(backups: list[BackupRecord], result: RetentionPlan) -> None:
    by_id = {b.id: b for b in backups}
    kept = set(result.keep_ids)
    for bid in kept:  # no orphans: every kept backup's existing ancestors are kept
        parent = by_id[bid].parent_id
        while parent in by_id:
            assert parent in kept, f"kept {bid} depends on deleted {parent}"
            parent = by_id[parent].parent_id
    for b in backups:
        if b.pinned:
            assert b.id in kept
    for lst in (result.keep, result.delete):  # sorted by start time
        assert [d.id for d in lst] == [b.id for b in sorted((by_id[d.id] for d in lst), key=lambda b: b.started)]


def test_output_is_sorted_whatever_the_input_order() -> None:
    backups = [bk(F, 1), bk(F, 40), bk(L, 3), bk(F, 35)]
    result = plan(backups, RetentionPolicy(), NOW)
    assert result.keep_ids == [ids(3, L), ids(1, F)]
    assert result.delete_ids == [ids(40, F), ids(35, F)]


def test_empty() -> None:
    result = plan([], RetentionPolicy(), NOW, [WalRecord("000000010000000000000001")])
    assert (result.keep, result.delete, result.wal_delete) == ([], [], [])
    assert result.wal_delete_before == {1: None}


@pytest.mark.parametrize(
    ("backups", "message"),
    [
        ([bk(F, 1), bk(F, 1)], "duplicate backup id"),
    ],
)
def test_plan_rejects(backups: list[BackupRecord], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(backups, RetentionPolicy(), NOW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "snapshot"}, "unknown kind"),
        ({"kind": "incr"}, "needs a parent_id"),
        ({"kind": "full", "parent_id": "x"}, "its own parent"),
        ({"kind": "full", "start_wal": "00000001.history"}, "not a WAL segment name"),
    ],
)
def test_backup_record_rejects(kwargs: dict[str, str], message: str) -> None:
    args: dict[str, object] = {"id": "x", "started": NOW, "finished": NOW} | kwargs
    with pytest.raises(ValueError, match=message):
        BackupRecord(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["full_days", "keep_count", "keep_daily", "wal_days"])
def test_policy_rejects_negative(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetentionPolicy(**{field: -1})


# --- WAL ---------------------------------------------------------------------------------
def wal(tli: int, *segnos: int) -> list[WalRecord]:
    return [WalRecord(f"{tli:08X}{s // 256:08X}{s % 256:08X}") for s in segnos]


def seg(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"


ARCHIVE = wal(1, *range(0x10, 0x60))

WalCase = tuple[list[BackupRecord], list[WalRecord], RetentionPolicy, dict[int, str | None], str, list[tuple[str, str]]]
# backups, archive, policy, wal_delete_before, reason, wal_protected
WAL_CASES: dict[str, WalCase] = {
    "anchor is the newest backup older than the window": (
        [bk(F, 20, seg=0x10), bk(F, 10, seg=0x20), bk(I, 8, seg=0x30, parent=ids(10, F)), bk(F, 3, seg=0x40)],
        ARCHIVE,
        RetentionPolicy(incremental_days=10),
        {1: seg(1, 0x30)},
        f"start of {ids(8, I)}, newest kept good physical backup started before the 7d WAL window",
        [(seg(1, 0x10), seg(1, 0x10)), (seg(1, 0x20), seg(1, 0x20))],
    ),
    "an expired incr does not anchor": (
        [bk(F, 20, seg=0x10), bk(F, 10, seg=0x20), bk(I, 8, seg=0x30, parent=ids(10, F)), bk(F, 3, seg=0x40)],
        ARCHIVE,
        RetentionPolicy(),
        {1: seg(1, 0x20)},
        f"start of {ids(10, F)}",
        [(seg(1, 0x10), seg(1, 0x10))],
    ),
    "no backup older than the window: oldest kept physical": (
        [bk(F, 5, seg=0x20), bk(F, 3, seg=0x40)],
        ARCHIVE,
        RetentionPolicy(),
        {1: seg(1, 0x20)},
        f"start of {ids(5, F)}, oldest kept physical backup",
        [],
    ),
    "deleted backups do not hold WAL": (
        [bk(F, 40, seg=0x10, segs=4), bk(F, 6, seg=0x30)],
        ARCHIVE,
        RetentionPolicy(),
        {1: seg(1, 0x30)},
        "oldest kept physical backup",
        [],
    ),
    "failed backup is not an anchor": (
        [bk(F, 12, seg=0x20), bk(F, 9, seg=0x30, good=False), bk(F, 2, seg=0x40)],
        ARCHIVE,
        RetentionPolicy(full_days=60),
        {1: seg(1, 0x20)},
        f"start of {ids(12, F)}",
        [],
    ),
    "logical backups only: keep all WAL": (
        [bk(L, 10), bk(L, 1)],
        ARCHIVE,
        RetentionPolicy(),
        {1: None},
        "no kept physical backup",
        [],
    ),
    "wal_days None keeps all WAL": (
        [bk(F, 20, seg=0x10), bk(F, 10, seg=0x20)],
        ARCHIVE,
        RetentionPolicy(wal_days=None),
        {1: None},
        "no WAL age limit",
        [],
    ),
    "several timelines": (
        [bk(F, 20, seg=0x10, segs=2), bk(F, 10, seg=0x20), bk(F, 2, seg=0x48, tli=2)],
        [*wal(1, *range(0x10, 0x45)), *wal(2, *range(0x44, 0x50)), *wal(3, 0x4F), *wal(4, 0x05)],
        RetentionPolicy(),
        {1: seg(1, 0x20), 2: seg(2, 0x20), 3: seg(3, 0x20), 4: seg(4, 0x20)},
        f"start of {ids(10, F)}",
        [(seg(1, 0x10), seg(1, 0x11))],
    ),
}


@pytest.mark.parametrize(
    ("backups", "archive", "policy", "boundaries", "reason", "protected"), list(WAL_CASES.values()), ids=list(WAL_CASES)
)
def test_wal_boundary(
    backups: list[BackupRecord],
    archive: list[WalRecord],
    policy: RetentionPolicy,
    boundaries: dict[int, str | None],
    reason: str,
    protected: list[tuple[str, str]],
) -> None:
    result = plan(backups, policy, NOW, archive)
    assert result.wal_delete_before == boundaries
    for tli in boundaries:
        assert reason in result.wal_reasons[tli]
    assert result.wal_protected == protected
    expected_delete = []
    for w in archive:
        boundary = boundaries.get(int(w.name[:8], 16))
        inside = any(lo <= w.name <= hi for lo, hi in protected)
        if boundary is not None and w.name < boundary and not inside:
            expected_delete.append(w.name)
    assert result.wal_delete == sorted(expected_delete)


def test_wal_of_older_kept_backups_is_protected() -> None:
    # The 60-day backup expires and takes its WAL with it; the kept 40-day one, older than the WAL window anchor
    # (10 days), keeps only the WAL that makes it consistent (0x18..0x19), not everything after it.
    backups = [bk(F, 60, seg=0x10, segs=3), bk(F, 40, seg=0x18, segs=2), bk(F, 10, seg=0x30), bk(F, 2, seg=0x50)]
    archive = [*ARCHIVE, WalRecord("000000010000000000000010.00000028.backup"), WalRecord("00000002.history")]
    result = plan(backups, RetentionPolicy(full_days=50), NOW, archive)
    assert result.keep_ids == [ids(40, F), ids(10, F), ids(2, F)]
    assert result.wal_delete_before == {1: seg(1, 0x30)}
    assert result.wal_protected == [(seg(1, 0x18), seg(1, 0x19))]
    assert set(result.wal_delete) == {seg(1, s) for s in range(0x10, 0x30) if s not in (0x18, 0x19)} | {
        "000000010000000000000010.00000028.backup"
    }
    assert "00000002.history" not in result.wal_delete


@pytest.mark.parametrize(
    ("name", "deletable"),
    [
        ("000000010000000000000010", True),
        ("000000010000000000000010.partial", True),
        ("000000010000000000000012", False),  # protected range
        ("000000010000000000000013", True),
        ("000000010000000000000020", False),  # at the boundary
        ("000000010000000000000021", False),
        ("000000020000000000000010", False),  # timeline without a boundary
        ("00000001.history", False),
        ("README", False),
    ],
)
def test_wal_deletable(name: str, deletable: bool) -> None:
    before: dict[int, str | None] = {1: seg(1, 0x20), 2: None}
    protected = [(seg(1, 0x11), seg(1, 0x12))]
    assert wal_deletable(name, before, protected) is deletable
