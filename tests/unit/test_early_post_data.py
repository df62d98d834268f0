"""Which post-data items are built while later tables load, and the runner that starts them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from saveit_backup.errors import PgToolError
from saveit_backup.ops.early_post_data import EarlyPostData, early_items, table_of_data
from saveit_backup.pg.custom_archive import SECTION_DATA, SECTION_POST_DATA, SECTION_PRE_DATA, TocEntry


def entry(dump_id: int, desc: str, tag: str, section: int, *deps: int, schema: str = "public") -> TocEntry:
    return TocEntry(dump_id, desc, tag, 0, 3, 0, schema, section, deps)


ENTRIES = {e.dump_id: e for e in [
    entry(1, "SCHEMA", "app", SECTION_PRE_DATA, schema=""),
    entry(2, "FUNCTION", "f()", SECTION_PRE_DATA),
    entry(10, "TABLE", "a", SECTION_PRE_DATA),
    entry(11, "TABLE", "b", SECTION_PRE_DATA),
    entry(12, "TABLE", "c", SECTION_PRE_DATA, schema="app"),
    entry(20, "TABLE DATA", "a", SECTION_DATA, 10),
    entry(21, "TABLE DATA", "b", SECTION_DATA, 11),
    entry(22, "TABLE DATA", "c", SECTION_DATA, 12, schema="app"),
    entry(30, "CONSTRAINT", "a a_pkey", SECTION_POST_DATA, 10),
    entry(31, "INDEX", "a_v_idx", SECTION_POST_DATA, 10),
    entry(32, "INDEX", "a_f_idx", SECTION_POST_DATA, 10, 2),  # an expression index on a function
    entry(33, "CONSTRAINT", "b b_pkey", SECTION_POST_DATA, 11),
    entry(34, "FK CONSTRAINT", "b b_a_fkey", SECTION_POST_DATA, 11, 30),
    entry(35, "TRIGGER", "a trg", SECTION_POST_DATA, 10, 2),
    entry(36, "INDEX", "ab_idx", SECTION_POST_DATA, 10, 11),  # not a real shape, but two tables
    entry(37, "CONSTRAINT", "c c_pkey", SECTION_POST_DATA, 12),
]}
ALL = sorted(ENTRIES)


@pytest.mark.parametrize(("loaded", "selected", "expected"), [
    (set(), ALL, []),
    ({10}, ALL, [30, 31]),  # not the function's index, the trigger or the two-table index
    ({10, 11}, ALL, [30, 31, 33, 36]),  # never the foreign key
    ({10, 11, 12}, ALL, [30, 31, 33, 36, 37]),
    ({10}, [31, 33], [31]),  # only what the restore selected
    ({20}, ALL, []),  # dump IDs of tables, not of their data
])
def test_early_items(loaded: set[int], selected: list[int], expected: list[int]) -> None:
    assert early_items(ENTRIES, selected, loaded) == expected


def test_table_of_data_maps_schema_and_name_to_the_table() -> None:
    assert table_of_data(ENTRIES) == {("public", "a"): 10, ("public", "b"): 11, ("app", "c"): 12}


def _listing() -> dict[int, bytes]:
    return {i: f"{i}; 0 0 {ENTRIES[i].desc} {ENTRIES[i].tag}".encode() for i in ALL if ENTRIES[i].desc != "TABLE DATA"}


def test_runner_starts_one_batch_per_loaded_table_and_reports_them(tmp_path: Path) -> None:
    lists: list[bytes] = []
    early = EarlyPostData(ENTRIES, _listing(), tmp_path, lambda p: lists.append(p.read_bytes()))
    early.table_loaded(("public", "a"))
    early.table_loaded(("public", "unknown"))  # a table without an entry (a name over the recorder's limit)
    early.table_loaded(("public", "b"))
    while len(lists) < 2:  # the runner is asynchronous
        threading.Event().wait(0.01)
    assert early.finish() == {30, 31, 33, 36}
    assert lists == [b"30; 0 0 CONSTRAINT a a_pkey\n31; 0 0 INDEX a_v_idx\n",
                     b"33; 0 0 CONSTRAINT b b_pkey\n36; 0 0 INDEX ab_idx\n"]


def test_runner_starts_nothing_after_finish_and_waits_for_the_batch_under_way(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[Path] = []

    def run(path: Path) -> None:
        ran.append(path)
        started.set()
        release.wait(5)

    early = EarlyPostData(ENTRIES, _listing(), tmp_path, run)
    early.table_loaded(("public", "a"))
    started.wait(5)
    early.table_loaded(("public", "b"))  # queued behind the running batch: left to the final post-data
    threading.Timer(0.1, release.set).start()
    assert early.finish() == {30, 31}
    assert len(ran) == 1


def test_a_failed_batch_is_raised_by_finish_and_stops_the_next(tmp_path: Path) -> None:
    calls: list[Path] = []

    def run(path: Path) -> None:
        calls.append(path)
        raise PgToolError("pg_restore failed: could not create unique index")

    early = EarlyPostData(ENTRIES, _listing(), tmp_path, run)
    early.table_loaded(("public", "a"))
    early.table_loaded(("public", "b"))
    while not calls:
        threading.Event().wait(0.01)
    with pytest.raises(PgToolError, match="could not create unique index"):
        early.finish()
    assert len(calls) == 1


def test_stop_reports_the_batch_under_way_and_join_waits_for_it(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()

    def run(_path: Path) -> None:
        started.set()
        release.wait(5)

    early = EarlyPostData(ENTRIES, _listing(), tmp_path, run)
    early.table_loaded(("public", "a"))
    started.wait(5)
    assert early.stop() == (set(), {30, 31})  # the final post-data leaves these out and may start now
    assert early.thread.is_alive()
    release.set()
    early.join()
    assert early.done == {30, 31} and not early.thread.is_alive()
