"""Table tests for saveit_backup.domain.wal and domain.timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from saveit_backup.domain.timeline import (
    TimelineSwitch,
    check_wal_continuity,
    parse_backup_label,
    parse_history,
    timeline_of_lsn,
    timeline_of_segment,
)
from saveit_backup.domain.wal import (
    DEFAULT_SEGMENT_SIZE,
    Lsn,
    Segment,
    WalFileKind,
    backup_history_file_name,
    check_segment_header,
    check_segment_size,
    classify_archive_name,
    history_file_name,
    lsn_to_segment,
    next_segment_name,
    parse_long_page_header,
    parse_segment_name,
    segment_name,
    segment_range,
    segment_start_lsn,
)

MiB = 1024 * 1024

# First 40 bytes of pg_wal/000000010000000000000001 from PostgreSQL 15 initdb (magic 0xD110,
# XLP_LONG_HEADER, timeline 1, pageaddr 0/1000000, sysid 7711919259600764428, 16 MiB, 8 KiB pages).
PG15_SEG1 = bytes.fromhex("10d1020001000000000000010000000000000000000000000c3eff04b53d066b0000000100200000")
# 000000010000000000000003 of the same cluster after pg_basebackup (info 0x0006: long header + bkp removable).
PG15_SEG3 = bytes.fromhex("10d1060001000000000000030000000000000000000000000c3eff04b53d066b0000000100200000")
PG15_SYSID = 7711919259600764428


def header(
    magic: int = 0xD110,
    info: int = 0x0002,
    tli: int = 1,
    pageaddr: int = 0x1000000,
    rem_len: int = 0,
    sysid: int = PG15_SYSID,
    seg_size: int = 16 * MiB,
    blcksz: int = 8192,
) -> bytes:
    import struct

    return struct.pack("<HHIQI4xQII", magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz)


def test_synthetic_header_matches_real_bytes() -> None:
    assert header() == PG15_SEG1
    assert header(info=6, pageaddr=0x3000000) == PG15_SEG3


# --- LSN ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value", "canonical"),
    [
        ("0/0", 0, "0/0"),
        ("0/2000028", 0x2000028, "0/2000028"),
        ("16/B374D848", 0x16B374D848, "16/B374D848"),
        ("16/b374d848", 0x16B374D848, "16/B374D848"),
        (" 1/0 ", 1 << 32, "1/0"),
        ("00000001/00000000", 1 << 32, "1/0"),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_lsn_parse_format(text: str, value: int, canonical: str) -> None:
    lsn = Lsn.parse(text)
    assert int(lsn) == value
    assert str(lsn) == canonical
    assert Lsn.parse(str(lsn)) == lsn


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "16/B374D848/1", "G/0", "123456789/0", "0/123456789", "1 /2"])
def test_lsn_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        Lsn.parse(text)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_lsn_range(value: int) -> None:
    with pytest.raises(ValueError):
        Lsn(value)


@pytest.mark.parametrize(
    ("a", "op", "b", "expected"),
    [
        ("0/2000028", "+", 0x38, Lsn.parse("0/2000060")),
        ("0/FFFFFFFF", "+", 1, Lsn.parse("1/0")),
        ("1/0", "-", 1, Lsn.parse("0/FFFFFFFF")),
        ("16/B374D848", "-", Lsn.parse("16/B374D800"), 0x48),
        ("0/1000000", "-", Lsn.parse("0/2000000"), -0x1000000),
    ],
)
def test_lsn_arithmetic(a: str, op: str, b: int | Lsn, expected: object) -> None:
    lsn = Lsn.parse(a)
    result = lsn + b if op == "+" else lsn - b  # type: ignore[operator]
    assert result == expected


@pytest.mark.parametrize(
    ("a", "b", "lt"),
    [("0/FFFFFFFF", "1/0", True), ("A/0", "9/FFFFFFFF", False), ("0/2000028", "0/2000060", True)],
)
def test_lsn_compare(a: str, b: str, lt: bool) -> None:
    assert (Lsn.parse(a) < Lsn.parse(b)) is lt
    assert sorted([Lsn.parse(b), Lsn.parse(a)])[0] == (Lsn.parse(a) if lt else Lsn.parse(b))


def test_lsn_underflow_is_an_error() -> None:
    with pytest.raises(ValueError):
        Lsn(0) - 1


# --- segment names --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tli", "segno", "segsize", "name"),
    [
        (1, 1, 16 * MiB, "000000010000000000000001"),
        (1, 0xFF, 16 * MiB, "0000000100000000000000FF"),
        (1, 0x100, 16 * MiB, "000000010000000100000000"),
        (2, 0x16B3, 16 * MiB, "0000000200000016000000B3"),
        (0xA, 0x16B3, 16 * MiB, "0000000A00000016000000B3"),
        (1, 0x100, 64 * MiB, "000000010000000400000000"),
        (1, 0x3F, 64 * MiB, "00000001000000000000003F"),
        (1, 4096, 1 * MiB, "000000010000000100000000"),
        (1, 5, 1024 * MiB, "000000010000000100000001"),
    ],
)
def test_segment_name_roundtrip(tli: int, segno: int, segsize: int, name: str) -> None:
    assert segment_name(tli, segno, segsize) == name
    assert parse_segment_name(name, segsize) == Segment(tli, segno)


@pytest.mark.parametrize(
    ("name", "segsize", "message"),
    [
        ("00000001000000000000001", 16 * MiB, "24 upper-case"),
        ("0000000100000000000000ff", 16 * MiB, "24 upper-case"),
        ("000000000000000000000001", 16 * MiB, "timeline 0"),
        ("000000010000000000000100", 16 * MiB, "out of range"),
        ("000000010000000000000040", 64 * MiB, "out of range"),
    ],
)
def test_parse_segment_name_rejects(name: str, segsize: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_segment_name(name, segsize)


@pytest.mark.parametrize("segsize", [0, 512 * 1024, 3 * MiB, 2048 * MiB])
def test_bad_segment_size(segsize: int) -> None:
    with pytest.raises(ValueError, match="segment size"):
        check_segment_size(segsize)


@pytest.mark.parametrize(
    ("lsn", "tli", "segsize", "name", "start"),
    [
        ("0/2000028", 1, 16 * MiB, "000000010000000000000002", "0/2000000"),
        ("0/1FFFFFF", 1, 16 * MiB, "000000010000000000000001", "0/1000000"),
        ("0/2000000", 1, 16 * MiB, "000000010000000000000002", "0/2000000"),
        ("16/B374D848", 1, 16 * MiB, "0000000100000016000000B3", "16/B3000000"),
        ("16/B374D848", 3, 64 * MiB, "00000003000000160000002C", "16/B0000000"),
        ("16/B374D848", 1, 1024 * MiB, "000000010000001600000002", "16/80000000"),
    ],
)
def test_lsn_to_segment(lsn: str, tli: int, segsize: int, name: str, start: str) -> None:
    assert lsn_to_segment(lsn, tli, segsize) == name
    assert lsn_to_segment(Lsn.parse(lsn), tli, segsize) == name
    assert segment_start_lsn(name, segsize) == Lsn.parse(start)


@pytest.mark.parametrize(
    ("name", "segsize", "expected"),
    [
        ("000000010000000000000001", 16 * MiB, "000000010000000000000002"),
        ("0000000100000000000000FF", 16 * MiB, "000000010000000100000000"),
        ("00000002000000000000003F", 64 * MiB, "000000020000000100000000"),
        ("000000010000000000000003", 1024 * MiB, "000000010000000100000000"),
    ],
)
def test_next_segment_name(name: str, segsize: int, expected: str) -> None:
    assert next_segment_name(name, segsize) == expected


@pytest.mark.parametrize(
    ("start", "end", "tli", "segsize", "expected"),
    [
        ("0/2000028", "0/2000100", 1, DEFAULT_SEGMENT_SIZE, ["000000010000000000000002"]),
        (
            "0/2000028",
            "0/4000000",
            1,
            DEFAULT_SEGMENT_SIZE,
            ["000000010000000000000002", "000000010000000000000003", "000000010000000000000004"],
        ),
        (
            "0/FE000000",
            "1/1000000",
            2,
            DEFAULT_SEGMENT_SIZE,
            [
                "0000000200000000000000FE",
                "0000000200000000000000FF",
                "000000020000000100000000",
                "000000020000000100000001",
            ],
        ),
        ("0/8000000", "0/BFFFFFF", 1, 64 * MiB, ["000000010000000000000002"]),
    ],
)
def test_segment_range(start: str, end: str, tli: int, segsize: int, expected: list[str]) -> None:
    assert segment_range(start, end, tli, segsize) == expected


def test_segment_range_backwards() -> None:
    with pytest.raises(ValueError, match="before its start"):
        segment_range("0/3000000", "0/2000000", 1)


# --- archive names ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kind", "tli", "segment"),
    [
        ("000000010000000000000002", WalFileKind.SEGMENT, 1, "000000010000000000000002"),
        ("0000000200000016000000B3", WalFileKind.SEGMENT, 2, "0000000200000016000000B3"),
        ("000000010000000000000003.partial", WalFileKind.PARTIAL, 1, "000000010000000000000003"),
        ("00000002.history", WalFileKind.HISTORY, 2, None),
        ("0000000A.history", WalFileKind.HISTORY, 10, None),
        ("000000010000000000000002.00000028.backup", WalFileKind.BACKUP, 1, "000000010000000000000002"),
        ("000000010000000000000002.00000028.backup.zst", WalFileKind.INVALID, None, None),
        ("000000010000000000000002.zst", WalFileKind.INVALID, None, None),
        ("0000000100000000000000ab", WalFileKind.INVALID, None, None),
        ("00000001000000000000000", WalFileKind.INVALID, None, None),
        ("000000010000000000000100", WalFileKind.INVALID, None, None),
        ("000000000000000000000001", WalFileKind.INVALID, None, None),
        ("00000000.history", WalFileKind.INVALID, None, None),
        ("00000002.History", WalFileKind.INVALID, None, None),
        ("000000010000000000000002.01000000.backup", WalFileKind.INVALID, None, None),
        ("archive_status", WalFileKind.INVALID, None, None),
        ("", WalFileKind.INVALID, None, None),
        ("../000000010000000000000002", WalFileKind.INVALID, None, None),
    ],
)
def test_classify_archive_name(name: str, kind: WalFileKind, tli: int | None, segment: str | None) -> None:
    info = classify_archive_name(name)
    assert (info.kind, info.tli, info.segment) == (kind, tli, segment)


def test_file_name_helpers() -> None:
    assert history_file_name(2) == "00000002.history"
    assert backup_history_file_name("0/2000028", 1) == "000000010000000000000002.00000028.backup"
    assert backup_history_file_name("16/B374D848", 3) == "0000000300000016000000B3.0074D848.backup"


# --- timeline history ------------------------------------------------------------------
HISTORY_3 = """1\t0/3000160\tno recovery target specified

# promoted again after a failover drill
2\t0/5000A28\tbefore 2026-11-20 10:00:00+00
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("1\t0/3000160\tno recovery target specified\n", [TimelineSwitch(1, Lsn.parse("0/3000160"), "no recovery target specified")]),
        (
            HISTORY_3,
            [
                TimelineSwitch(1, Lsn.parse("0/3000160"), "no recovery target specified"),
                TimelineSwitch(2, Lsn.parse("0/5000A28"), "before 2026-11-20 10:00:00+00"),
            ],
        ),
        ("1\t0/3000160\n", [TimelineSwitch(1, Lsn.parse("0/3000160"), "")]),
        ('1 0/3000160 at restore point "x"\n', [TimelineSwitch(1, Lsn.parse("0/3000160"), 'at restore point "x"')]),
    ],
)
def test_parse_history(text: str, expected: list[TimelineSwitch]) -> None:
    assert parse_history(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\n", "expected"),
        ("x\t0/1\tr\n", "not a number"),
        ("1\tnope\tr\n", "invalid LSN"),
        ("2\t0/5000000\tr\n1\t0/6000000\tr\n", "must increase"),
        ("1\t0/5000000\tr\n2\t0/4000000\tr\n", "before"),
        ("0\t0/5000000\tr\n", "does not exist"),
    ],
)
def test_parse_history_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_history(text)


@pytest.mark.parametrize(
    ("lsn", "target", "expected"),
    [
        ("0/2000028", 3, 1),
        ("0/300015F", 3, 1),
        ("0/3000160", 3, 2),  # the switch point belongs to the child
        ("0/5000A27", 3, 2),
        ("0/5000A28", 3, 3),
        ("5/0", 3, 3),
    ],
)
def test_timeline_of_lsn(lsn: str, target: int, expected: int) -> None:
    assert timeline_of_lsn(lsn, target, parse_history(HISTORY_3)) == expected


@pytest.mark.parametrize(("segno", "expected"), [(2, 1), (3, 2), (4, 2), (5, 3), (6, 3)])
def test_timeline_of_segment(segno: int, expected: int) -> None:
    assert timeline_of_segment(segno, 3, parse_history(HISTORY_3), DEFAULT_SEGMENT_SIZE) == expected


# --- continuity -------------------------------------------------------------------------
def segs(tli: int, *segnos: int) -> list[str]:
    return [segment_name(tli, s) for s in segnos]


@pytest.mark.parametrize(
    ("archived", "histories", "start", "start_tli", "target", "stop", "chain", "missing", "switch_tlis"),
    [
        # one timeline, complete
        (segs(1, 2, 3, 4), {}, "0/2000028", 1, None, None, segs(1, 2, 3, 4), [], []),
        # archive also holds older segments, .partial/.backup/.history files: ignored
        (
            [*segs(1, 1, 2, 3), "000000010000000000000002.00000028.backup", "000000010000000000000004.partial"],
            {},
            "0/2000028",
            1,
            None,
            None,
            segs(1, 2, 3),
            [],
            [],
        ),
        # a gap
        (segs(1, 2, 3, 5, 6), {}, "0/2000028", 1, None, None, segs(1, 2, 3, 4, 5, 6), segs(1, 4), []),
        # nothing archived yet: the start segment is missing
        ([], {}, "0/2000028", 1, None, None, segs(1, 2), segs(1, 2), []),
        # stop_lsn later than anything archived: the chain reaches it
        (segs(1, 2), {}, "0/2000028", 1, None, "0/4000100", segs(1, 2, 3, 4), segs(1, 3, 4), []),
        # promotion at 0/3000160: segment 3 comes from timeline 2, timeline 1's copy is superseded
        (
            [*segs(1, 2, 3), *segs(2, 3, 4)],
            {2: "1\t0/3000160\tno recovery target specified\n"},
            "0/2000028",
            1,
            2,
            None,
            [*segs(1, 2), *segs(2, 3, 4)],
            [],
            [1],
        ),
        # target None follows the newest history; timeline 2 copy of segment 3 missing
        (
            [*segs(1, 2, 3, 4), *segs(2, 4, 5)],
            {2: "1\t0/3000160\tno recovery target specified\n"},
            "0/2000028",
            1,
            None,
            None,
            [*segs(1, 2), *segs(2, 3, 4, 5)],
            segs(2, 3),
            [1],
        ),
        # staying on timeline 1 ignores timeline 2
        (
            [*segs(1, 2, 3, 4), *segs(2, 3, 4, 5)],
            {2: "1\t0/3000160\tno recovery target specified\n"},
            "0/2000028",
            1,
            1,
            None,
            segs(1, 2, 3, 4),
            [],
            [],
        ),
        # two switches, backup taken on timeline 2
        (
            [*segs(2, 4), *segs(3, 5, 6)],
            {3: HISTORY_3},
            "0/4000028",
            2,
            3,
            None,
            [*segs(2, 4), *segs(3, 5, 6)],
            [],
            [2],
        ),
        # backup on timeline 1 crossing both switches, a dead branch (timeline 2 past its switch) is ignored
        (
            [*segs(1, 2), *segs(2, 3, 4, 5, 6), *segs(3, 5, 6)],
            {3: HISTORY_3},
            "0/2000028",
            1,
            3,
            None,
            [*segs(1, 2), *segs(2, 3, 4), *segs(3, 5, 6)],
            [],
            [1, 2],
        ),
    ],
)
def test_check_wal_continuity(
    archived: list[str],
    histories: dict[int, str],
    start: str,
    start_tli: int,
    target: int | None,
    stop: str | None,
    chain: list[str],
    missing: list[str],
    switch_tlis: list[int],
) -> None:
    result = check_wal_continuity(archived, histories, start, start_tli, target, stop)
    assert result.segments == chain
    assert result.missing == missing
    assert result.first_gap == (missing[0] if missing else None)
    assert result.complete is (not missing)
    assert [s.tli for s in result.switches] == switch_tlis


def test_continuity_reports_ignored_and_last_contiguous() -> None:
    result = check_wal_continuity([*segs(1, 2, 3, 4), *segs(2, 3, 5)], {2: "1\t0/3000160\tr\n"}, "0/2000028", 1, 2)
    assert result.ignored == segs(1, 3, 4)
    assert result.first_gap == "000000020000000000000004"
    assert result.last_contiguous == "000000020000000000000003"
    assert result.newest_archived == "000000020000000000000005"


@pytest.mark.parametrize(
    ("histories", "start", "start_tli", "target", "message"),
    [
        ({}, "0/2000028", 1, 2, "00000002.history is missing"),
        ({2: "1\t0/3000160\tr\n"}, "0/4000000", 1, 2, "not on the history"),  # started after tli 1 ended
        ({3: HISTORY_3}, "0/2000028", 2, 3, "not on the history"),  # tli 2 began at 0/3000160
        ({}, "0/2000028", 2, 1, "older than"),
    ],
)
def test_check_wal_continuity_rejects(histories: dict[int, str], start: str, start_tli: int, target: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_wal_continuity([], histories, start, start_tli, target)


# --- page header ------------------------------------------------------------------------
def test_parse_real_pg15_header() -> None:
    hdr = parse_long_page_header(PG15_SEG1)
    assert (hdr.magic, hdr.info, hdr.tli, hdr.pageaddr, hdr.rem_len) == (0xD110, 2, 1, Lsn.parse("0/1000000"), 0)
    assert (hdr.sysid, hdr.seg_size, hdr.xlog_blcksz, hdr.pg_major) == (PG15_SYSID, 16 * MiB, 8192, 15)


@pytest.mark.parametrize(
    ("name", "data", "kwargs", "sysid"),
    [
        ("000000010000000000000001", PG15_SEG1, {}, PG15_SYSID),
        ("000000010000000000000003", PG15_SEG3, {"segsize": 16 * MiB, "sysid": PG15_SYSID}, PG15_SYSID),
        ("000000010000000000000001.partial", PG15_SEG1 + b"\0" * 100, {}, PG15_SYSID),
        ("0000000200000016000000B3", header(tli=2, pageaddr=0x16B3000000, magic=0xD116, sysid=42), {}, 42),
        ("000000030000001600000002", header(tli=3, pageaddr=0x1680000000, seg_size=1024 * MiB), {}, PG15_SYSID),
        ("00000001000000000000003F", header(pageaddr=0xFC000000, seg_size=64 * MiB), {}, PG15_SYSID),
        # first segment of timeline 2 after a promotion: a copy of the parent's segment, first page on timeline 1
        ("000000020000000000000001", PG15_SEG1, {}, PG15_SYSID),
    ],
)
def test_check_segment_header_ok(name: str, data: bytes, kwargs: dict[str, int], sysid: int) -> None:
    assert check_segment_header(name, data, **kwargs).sysid == sysid


@pytest.mark.parametrize(
    ("name", "data", "kwargs", "message"),
    [
        ("000000010000000000000002", PG15_SEG1, {}, r"page address 0/1000000 does not match .* 000000010000000000000001"),
        ("000000010000000000000001", header(tli=2), {}, "header timeline 2 is newer than the file name's timeline 1"),
        ("000000010000000000000001", PG15_SEG1, {"segsize": 64 * MiB}, "segment size 16777216 does not match"),
        ("000000010000000000000001", PG15_SEG1, {"sysid": 1}, "system identifier"),
        ("000000010000000000000001", PG15_SEG1[:39], {}, "too short"),
        ("000000010000000000000001", b"\0" * 40, {}, "not a WAL segment"),
        ("000000010000000000000001", b"PK\x03\x04" + b"\0" * 36, {}, "not a WAL segment"),
        ("000000010000000000000001", header(info=0), {}, "long header"),
        ("000000010000000000000001", header(info=0x0102), {}, "flags"),
        ("000000010000000000000001", header(seg_size=3 * MiB), {}, "invalid segment size"),
        ("00000001000000000000004F", header(pageaddr=0x13C000000, seg_size=64 * MiB), {}, "out of range"),
        ("00000002.history", PG15_SEG1, {}, "not a WAL segment file name"),
        ("000000010000000000000001.00000028.backup", PG15_SEG1, {}, "not a WAL segment file name"),
    ],
)
def test_check_segment_header_rejects(name: str, data: bytes, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_segment_header(name, data, **kwargs)


# --- backup_label -----------------------------------------------------------------------
# Written by pg_basebackup against PostgreSQL 15.
LABEL_PG15 = """START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
CHECKPOINT LOCATION: 0/2000060
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2026-11-25 01:45:35 UTC
LABEL: pg_basebackup base backup
START TIMELINE: 1
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            LABEL_PG15,
            {
                "start_wal_lsn": Lsn.parse("0/2000028"),
                "start_wal_file": "000000010000000000000002",
                "checkpoint_lsn": Lsn.parse("0/2000060"),
                "start_timeline": 1,
                "label": "pg_basebackup base backup",
                "start_time": datetime(2026, 11, 25, 1, 45, 35, tzinfo=UTC),
                "start_time_text": "2026-11-25 01:45:35 UTC",
                "backup_method": "streamed",
                "backup_from": "primary",
            },
        ),
        (
            "START WAL LOCATION: 16/B374D848 (file 0000000300000016000000B3)\n"
            "CHECKPOINT LOCATION: 16/B374D880\n"
            "BACKUP METHOD: pg_backup_start\n"
            "BACKUP FROM: standby\n"
            "START TIME: 2026-11-20 10:00:00 +0530\n"
            "LABEL: saveit: 20261120-043000F\n"
            "START TIMELINE: 3\n",
            {
                "start_wal_lsn": Lsn.parse("16/B374D848"),
                "start_wal_file": "0000000300000016000000B3",
                "checkpoint_lsn": Lsn.parse("16/B374D880"),
                "start_timeline": 3,
                "label": "saveit: 20261120-043000F",
                "start_time": datetime(2026, 11, 20, 10, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
                "start_time_text": "2026-11-20 10:00:00 +0530",
                "backup_method": "pg_backup_start",
                "backup_from": "standby",
            },
        ),
        (  # PG 10 style: no START TIMELINE, zone abbreviation we cannot resolve
            "START WAL LOCATION: 0/9000028 (file 000000010000000000000009)\n"
            "CHECKPOINT LOCATION: 0/9000060\n"
            "START TIME: 2026-11-20 10:00:00 CET\n",
            {
                "start_wal_lsn": Lsn.parse("0/9000028"),
                "start_wal_file": "000000010000000000000009",
                "checkpoint_lsn": Lsn.parse("0/9000060"),
                "start_timeline": None,
                "label": None,
                "start_time": None,
                "start_time_text": "2026-11-20 10:00:00 CET",
                "backup_method": None,
                "backup_from": None,
            },
        ),
    ],
)
def test_parse_backup_label(text: str, expected: dict[str, object]) -> None:
    assert dict(parse_backup_label(text)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CHECKPOINT LOCATION: 0/2000060\n", "missing START WAL LOCATION"),
        ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n", "missing CHECKPOINT LOCATION"),
        ("START WAL LOCATION: 0/2000028\nCHECKPOINT LOCATION: 0/2000060\n", "expected 'X/X"),
        (
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 2\n",
            "does not match",
        ),
        (
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000000\n",
            "before START WAL LOCATION",
        ),
        ("garbage\n", "expected 'KEY: value'"),
    ],
)
def test_parse_backup_label_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_backup_label(text)
