"""Rebuilding a file from PostgreSQL incremental files (pg_combinebackup's rules), without a server."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import pytest

from saveit_backup.errors import IntegrityError
from saveit_backup.ops.native_combine import MAGIC, Incremental, _Pending, rebuild

BS = 16  # tiny blocks: the rules do not depend on the size


def block(tag: int) -> bytes:
    return bytes([tag]) * BS


def incremental(path: Path, truncation: int, blocks: dict[int, int]) -> Incremental:
    """An INCREMENTAL file holding ``blocks`` (block number -> tag), padded like the server's."""
    numbers = sorted(blocks)
    head = struct.pack(f"<III{len(numbers)}I", MAGIC, len(numbers), truncation, *numbers)
    if numbers and len(head) % BS:
        head += bytes(BS - len(head) % BS)
    path.write_bytes(head + b"".join(block(blocks[n]) for n in numbers))
    return Incremental(path, BS, path.name)


def rebuilt(tmp_path: Path, sources: list[Incremental], full: bytes | None) -> list[int]:
    pending = _Pending(sources[0])
    pending.sources = list(sources)
    out = tmp_path / "out"
    rebuild(out, pending, io.BytesIO(full) if full is not None else None, len(full or b""), BS)
    data = out.read_bytes()
    assert len(data) % BS == 0
    return [data[i] for i in range(0, len(data), BS)]


@pytest.mark.parametrize(
    ("newest", "older", "full_tags", "expected"),
    [
        # newest blocks win; the rest of the truncation length comes from the full copy
        ((4, {1: 21}), [], [1, 2, 3, 4], [1, 21, 3, 4]),
        # an older incremental supplies what the newest lacks, before the full copy
        ((4, {1: 21}), [(4, {1: 11, 2: 12})], [1, 2, 3, 4], [1, 21, 12, 4]),
        # truncated: the full copy's blocks past the newest truncation length are not used
        ((2, {}), [], [1, 2, 3, 4], [1, 2]),
        # newest blocks past its truncation length extend the file; the gap is zeros
        ((2, {4: 25}), [], [1, 2, 3, 4], [1, 2, 0, 0, 25]),
        # older incrementals count only below the newest truncation length
        ((2, {}), [(4, {3: 13})], [1, 2, 3, 4], [1, 2]),
        # blocks within the truncation length that no backup holds are zeros (extended, never logged)
        ((5, {0: 20}), [], [1, 2], [20, 2, 0, 0, 0]),
    ],
)
def test_rebuild_rules(tmp_path: Path, newest: tuple[int, dict[int, int]], older: list[tuple[int, dict[int, int]]],
                       full_tags: list[int], expected: list[int]) -> None:
    sources = [incremental(tmp_path / "INCREMENTAL.n", *newest)]
    sources += [incremental(tmp_path / f"INCREMENTAL.o{i}", *o) for i, o in enumerate(older)]
    assert rebuilt(tmp_path, sources, b"".join(block(t) for t in full_tags)) == expected


def test_a_whole_copy_in_an_older_incremental_ends_the_search(tmp_path: Path) -> None:
    whole = block(7) + block(8) + block(9)  # the file was new then: streamed like the full backup's copy
    assert rebuilt(tmp_path, [incremental(tmp_path / "INCREMENTAL.n", 3, {2: 29})], whole) == [7, 8, 29]


def test_damaged_incremental_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "INCREMENTAL.bad"
    bad.write_bytes(struct.pack("<III", 0x12345678, 0, 4))
    with pytest.raises(IntegrityError, match="not a PostgreSQL incremental file"):
        Incremental(bad, BS, "bad")
    short = tmp_path / "INCREMENTAL.short"
    short.write_bytes(struct.pack("<IIII", MAGIC, 1, 4, 0) + bytes(BS - 16 % BS if 16 % BS else 0))
    with pytest.raises(IntegrityError, match="shorter than its 1 blocks"):
        Incremental(short, BS, "short")


def test_incremental_names_only_under_relation_directories() -> None:
    from saveit_backup.ops.native_combine import _bare

    assert _bare("base/5/INCREMENTAL.16384") == "base/5/16384"
    assert _bare("global/INCREMENTAL.1262") == "global/1262"
    assert _bare("INCREMENTAL.conf") is None  # a user's file in the data directory is copied as it is
    assert _bare("conf.d/INCREMENTAL.x") is None


def test_chain_must_be_what_the_server_took_it_against() -> None:
    from types import SimpleNamespace

    from saveit_backup.ops.native_combine import _check_incremental_from

    older: Any = SimpleNamespace(id="20261202-000000F", physical={"start_lsn": "0/5000028", "timeline": 1})
    newer: Any = SimpleNamespace(id="20261202-010000I", physical={})
    good = b"START WAL LOCATION: 0/7000028 (file 000000010000000000000007)\nINCREMENTAL FROM LSN: 0/5000028\nINCREMENTAL FROM TLI: 1\n"
    _check_incremental_from(good, newer, older)
    with pytest.raises(IntegrityError, match="was taken against the backup that started at 0/6000028"):
        _check_incremental_from(good.replace(b"FROM LSN: 0/5000028", b"FROM LSN: 0/6000028"), newer, older)
    with pytest.raises(IntegrityError, match="timeline 2"):
        _check_incremental_from(good.replace(b"FROM TLI: 1", b"FROM TLI: 2"), newer, older)


def test_header_values_beyond_a_segment_are_refused(tmp_path: Path) -> None:
    huge = tmp_path / "INCREMENTAL.huge"
    huge.write_bytes(struct.pack("<III", MAGIC, 0, 1 << 30))
    with pytest.raises(IntegrityError, match="more than a segment"):
        Incremental(huge, BS, "huge")
