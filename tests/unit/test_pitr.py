"""Table tests for saveit_backup.domain.pitr."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from saveit_backup.domain.pitr import (
    PhysicalBackup,
    RecoveryTarget,
    choose_backup,
    quote_conf_value,
    recovery_settings,
    render_conf,
)
from saveit_backup.domain.timeline import parse_history
from saveit_backup.domain.wal import Lsn


def ts(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def pb(
    bid: str,
    kind: str,
    day: int,
    start: str,
    stop: str,
    tli: int = 1,
    good: bool = True,
) -> PhysicalBackup:
    return PhysicalBackup(
        id=bid,
        kind=kind,
        started=ts(day, 1),
        finished=ts(day, 1, 30),
        start_lsn=Lsn.parse(start),
        stop_lsn=Lsn.parse(stop),
        timeline=tli,
        good=good,
    )


BACKUPS = [
    pb("20261110-010000F", "full", 10, "0/2000028", "0/2000138"),
    pb("20261112-010000I", "incr", 12, "0/5000028", "0/5000100"),
    pb("20261114-010000L", "logical", 14, "0/0", "0/0"),
    pb("20261115-010000F", "full", 15, "0/9000028", "0/9000138", good=False),
    pb("20261116-010000D", "diff", 16, "0/C000028", "0/C000100"),
    pb("20261118-010000F", "full", 18, "1/0000028", "1/0000138", tli=2),
]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (RecoveryTarget.at_time(ts(11)), "20261110-010000F"),
        (RecoveryTarget.at_time(ts(10, 1, 31)), "20261110-010000F"),
        (RecoveryTarget.at_time(ts(12, 1, 30)), "20261110-010000F"),  # incr finished exactly then: not before
        (RecoveryTarget.at_time(ts(12, 1, 31)), "20261112-010000I"),
        (RecoveryTarget.at_time(ts(15, 12)), "20261112-010000I"),  # logical and failed backups skipped
        (RecoveryTarget.at_time(ts(17)), "20261116-010000D"),
        (RecoveryTarget.at_time(datetime(2026, 11, 17, 22, 0, tzinfo=timezone(timedelta(hours=-5)))), "20261118-010000F"),
        (RecoveryTarget.at_lsn("0/2000138"), "20261110-010000F"),
        (RecoveryTarget.at_lsn("0/5000FFF"), "20261112-010000I"),
        (RecoveryTarget.at_lsn("0/FFFFFFFF"), "20261116-010000D"),
        (RecoveryTarget.at_lsn("2/0"), "20261118-010000F"),
        (RecoveryTarget.at_xid(1234), "20261118-010000F"),
        (RecoveryTarget.at_name("before-migration"), "20261118-010000F"),
        (RecoveryTarget.immediate(), "20261118-010000F"),
        (RecoveryTarget.latest(), "20261118-010000F"),
    ],
)
def test_choose_backup(target: RecoveryTarget, expected: str) -> None:
    assert choose_backup(BACKUPS, target).id == expected


HISTORY = parse_history("1\t0/E000000\tno recovery target specified\n")
BRANCHES = [
    pb("20261110-010000F", "full", 10, "0/2000028", "0/2000138", tli=1),
    pb("20261116-010000F", "full", 16, "0/F000028", "0/F000138", tli=1),  # tli 1 after the switch: a dead branch
    pb("20261117-010000F", "full", 17, "0/E800028", "0/E800138", tli=2),
]


@pytest.mark.parametrize(
    ("target", "timeline", "expected"),
    [
        (RecoveryTarget.latest(), None, "20261117-010000F"),
        (RecoveryTarget.latest(), 2, "20261117-010000F"),
        (RecoveryTarget.at_time(ts(17)), 2, "20261110-010000F"),  # 20261116 is not on timeline 2's history
        (RecoveryTarget.at_time(ts(17)), None, "20261116-010000F"),
        (RecoveryTarget.latest(), 1, "20261116-010000F"),
    ],
)
def test_choose_backup_on_timeline(target: RecoveryTarget, timeline: int | None, expected: str) -> None:
    history = HISTORY if timeline == 2 else []
    assert choose_backup(BRANCHES, target, timeline, history).id == expected


@pytest.mark.parametrize(
    ("backups", "target", "message"),
    [
        ([], RecoveryTarget.latest(), "no physical backup exists"),
        ([BACKUPS[2]], RecoveryTarget.latest(), "no physical backup exists"),
        ([BACKUPS[3]], RecoveryTarget.immediate(), "no good physical backup: all 1"),
        (
            BACKUPS,
            RecoveryTarget.at_time(ts(10, 1, 30)),
            r"no good physical backup finished before 2026-11-10 01:30:00\+00:00; the oldest, 20261110-010000F",
        ),
        (
            BACKUPS,
            RecoveryTarget.at_lsn("0/2000137"),
            "no good physical backup ends at or before LSN 0/2000137; the earliest, 20261110-010000F, ends at 0/2000138",
        ),
    ],
)
def test_choose_backup_rejects(backups: list[PhysicalBackup], target: RecoveryTarget, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_backup(backups, target)


def test_choose_backup_off_timeline() -> None:
    with pytest.raises(ValueError, match="history of timeline 3"):
        choose_backup(BRANCHES[1:2], RecoveryTarget.latest(), 3, parse_history("1\t0/E000000\tx\n2\t0/E900000\ty\n"))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RecoveryTarget.at_time(datetime(2026, 11, 20, 10, 0)), "has no time zone"),
        (lambda: RecoveryTarget.at_xid(2), "normal transaction id"),
        (lambda: RecoveryTarget.at_name(""), "needs a restore point name"),
        (lambda: RecoveryTarget.at_name("x" * 64), "longer than 63 bytes"),
        (lambda: RecoveryTarget.at_lsn("nope"), "invalid LSN"),
        (lambda: RecoveryTarget("time"), "needs a time"),
        (lambda: RecoveryTarget("lsn"), "needs an LSN"),
        (lambda: RecoveryTarget("snapshot"), "unknown recovery target kind"),  # type: ignore[arg-type]
    ],
)
def test_target_rejects(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


RC = "saveit-backup wal-fetch %f %p"


@pytest.mark.parametrize(
    ("target", "timeline", "action", "expected"),
    [
        (
            RecoveryTarget.at_time(datetime(2026, 11, 20, 10, 0, tzinfo=UTC)),
            "latest",
            "pause",
            {
                "restore_command": "'saveit-backup wal-fetch %f %p'",
                "recovery_target_time": "'2026-11-20 10:00:00+00:00'",
                "recovery_target_timeline": "'latest'",
                "recovery_target_action": "'pause'",
            },
        ),
        (
            RecoveryTarget.at_time(
                datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
                inclusive=False,
            ),
            2,
            "promote",
            {
                "restore_command": "'saveit-backup wal-fetch %f %p'",
                "recovery_target_time": "'2026-11-20 10:00:00.123456+05:30'",
                "recovery_target_inclusive": "'off'",
                "recovery_target_timeline": "'2'",
                "recovery_target_action": "'promote'",
            },
        ),
        (
            RecoveryTarget.at_lsn("16/B374D848"),
            "current",
            "shutdown",
            {
                "restore_command": "'saveit-backup wal-fetch %f %p'",
                "recovery_target_lsn": "'16/B374D848'",
                "recovery_target_timeline": "'current'",
                "recovery_target_action": "'shutdown'",
            },
        ),
        (
            RecoveryTarget.at_xid(4_294_967_300),
            None,
            "pause",
            {
                "restore_command": "'saveit-backup wal-fetch %f %p'",
                "recovery_target_xid": "'4294967300'",
                "recovery_target_action": "'pause'",
            },
        ),
        (
            RecoveryTarget.at_name("before 'v2' migration"),
            "3",
            "promote",
            {
                "restore_command": "'saveit-backup wal-fetch %f %p'",
                "recovery_target_name": "'before ''v2'' migration'",
                "recovery_target_timeline": "'3'",
                "recovery_target_action": "'promote'",
            },
        ),
        (
            RecoveryTarget.immediate(),
            "latest",
            "promote",
            {
                "restore_command": "'saveit-backup wal-fetch %f %p'",
                "recovery_target": "'immediate'",
                "recovery_target_timeline": "'latest'",
                "recovery_target_action": "'promote'",
            },
        ),
        (
            RecoveryTarget.latest(),
            "latest",
            "promote",
            {
                "restore_command": "'saveit-backup wal-fetch %f %p'",
                "recovery_target_timeline": "'latest'",
                "recovery_target_action": "'promote'",
            },
        ),
    ],
)
def test_recovery_settings(target: RecoveryTarget, timeline: int | str | None, action: str, expected: dict[str, str]) -> None:
    assert recovery_settings(target, RC, timeline, action) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", "'plain'"),
        ("it's", "'it''s'"),
        ("''", "''''''"),
        (r"C:\wal\%f", r"'C:\\wal\\%f'"),  # the GUC lexer treats backslash as an escape
        ('cp "/mnt/a b/%f" "%p"', '\'cp "/mnt/a b/%f" "%p"\''),
        ("", "''"),
    ],
)
def test_quote_conf_value(value: str, quoted: str) -> None:
    assert quote_conf_value(value) == quoted


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"restore_command": "  "}, "restore_command is empty"),
        ({"restore_command": "cp %f %p\nrm -rf /"}, "line break"),
        ({"action": "resume"}, "invalid recovery target action"),
        ({"timeline": 0}, "timelines start at 1"),
        ({"timeline": "newest"}, "invalid recovery target timeline"),
    ],
)
def test_recovery_settings_rejects(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"target": RecoveryTarget.latest(), "restore_command": RC} | kwargs
    with pytest.raises(ValueError, match=message):
        recovery_settings(**args)  # type: ignore[arg-type]


def test_render_conf() -> None:
    settings = recovery_settings(RecoveryTarget.at_name("x"), "cp '/a/%f' %p", 2, "promote")
    assert render_conf(settings) == (
        "restore_command = 'cp ''/a/%f'' %p'\n"
        "recovery_target_name = 'x'\n"
        "recovery_target_timeline = '2'\n"
        "recovery_target_action = 'promote'\n"
    )
