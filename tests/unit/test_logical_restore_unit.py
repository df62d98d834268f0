"""pg_restore's stderr: the error line a failure reports, and which lines start an early row count."""

from __future__ import annotations

import pytest

from saveit_backup.errors import PgToolError
from saveit_backup.ops import logical_restore
from saveit_backup.ops.logical_restore import EarlyCounts, _run
from saveit_backup.pg.custom_archive import TocEntry


def test_failure_reports_the_error_line_not_the_last_verbose_line() -> None:
    script = ('echo "pg_restore: processing item 3 TABLE t" >&2; '
              'echo "pg_restore: error: could not execute query: ERROR:  relation \\"t\\" already exists" >&2; '
              'echo "pg_restore: finished item 3 TABLE DATA t" >&2; exit 1')
    lines: list[str] = []
    with pytest.raises(PgToolError, match='sh failed: pg_restore: error: could not execute query: ERROR:  relation "t" already exists'):
        _run(["sh", "-c", script], {}, None, on_stderr_line=lines.append)
    assert lines[-1] == "pg_restore: finished item 3 TABLE DATA t"


def test_only_finished_table_data_of_wanted_tables_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(logical_restore, "_count_rows", lambda conn, schema, name: counted.append((schema, name)) or 7)
    monkeypatch.setattr(logical_restore, "connect", lambda dsn: type("Conn", (), {"close": lambda self: None})())
    entries = {5: TocEntry(5, "TABLE DATA", "accounts", 0, 1, 0, "public"),
               6: TocEntry(6, "TABLE DATA", "accounts", 0, 1, 0, "audit"),
               7: TocEntry(7, "TABLE DATA", "other", 0, 1, 0, "public")}
    early = EarlyCounts("dbname=x", {("public", "accounts"), ("audit", "accounts")}, entries)
    for line in ("pg_restore: launching item 5 TABLE DATA accounts",  # started, not committed yet
                 "pg_restore: finished item 5 TABLE DATA accounts",
                 "pg_restore: finished item 7 TABLE DATA other",  # not selected for the comparison
                 "pg_restore: finished item 6 TABLE DATA accounts",  # same name, other schema
                 "pg_restore: finished item 99 TABLE DATA ghost",  # not in the TOC
                 "pg_restore: finished item 5 TABLE DATA accounts"):  # reported twice: counted once
        early.on_line(line)
    assert early.finish() == {("public", "accounts"): 7, ("audit", "accounts"): 7}
    assert sorted(counted) == [("audit", "accounts"), ("public", "accounts")]


def test_inline_table_data_keeps_nothing_when_no_table_is_selected() -> None:
    from saveit_backup.ops.logical_restore import InlineTableData
    from saveit_backup.pg.custom_archive import OffsetRecorder

    inline = InlineTableData(OffsetRecorder(drop_table_data=True))
    inline.on_dropped(100, memoryview(b"x" * 10), False)
    assert inline.backlog == [(100, b"x" * 10, False)]  # waits for the loader
    assert not inline.usable(set())
    inline.on_dropped(110, memoryview(b"y" * 10), False)
    assert inline.backlog is None  # a restore without table data holds none of it in memory
