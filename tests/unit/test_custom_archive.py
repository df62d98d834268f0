"""Data offsets of custom-format archives: hand-built archives fed in every split, then patched in a file."""

from __future__ import annotations

import io
import itertools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from saveit_backup.pg import custom_archive as ca


# --- a small writer of the format (the layout in custom_archive's docstring) -------------------
def _int(value: int, size: int = 4) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(size, "little")


def _str(text: str | None) -> bytes:
    if text is None:
        return _int(-1)
    raw = text.encode()
    return _int(len(raw)) + raw


@dataclass
class Entry:
    dump_id: int
    desc: str
    data: list[bytes] | None = None  # chunks of a BLK_DATA block; None: no data
    blobs: list[tuple[int, list[bytes]]] | None = None  # (OID, chunks) of a BLK_BLOBS block
    deps: list[int] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return self.data is not None or self.blobs is not None


def build(entries: list[Entry], minor: int = 14, compression: int = 0, offsets: dict[int, int] | None = None,
          order: list[int] | None = None) -> tuple[bytes, dict[int, int]]:
    """An archive as pg_dump writes it to a pipe (``offsets`` None) or to a file; and where each block starts."""
    head = ca.MAGIC + bytes([1, minor, 0, 4, 8, ca.FORMAT_CUSTOM])
    head += bytes([compression]) if minor >= 15 else _int(6 if compression else 0)
    head += b"".join(_int(v) for v in (12, 30, 4, 25, 10, 126, 0)) + _str("db") + _str("15.18") + _str("15.18")
    toc = _int(len(entries))
    for e in entries:
        toc += _int(e.dump_id) + _int(1 if e.has_data else 0) + _str("1259") + _str(str(16000 + e.dump_id))
        toc += _str(f"tag{e.dump_id}") + _str(e.desc) + _int(2 if e.has_data else 1)
        toc += _str("CREATE ...;\n" if not e.has_data else "") + _str("DROP ...;") + _str("COPY t FROM stdin;\n")
        toc += _str("public") + _str("") + _str("heap" if e.desc == "TABLE" else None)
        toc += _int(ord("r")) if minor >= 16 else b""
        toc += _str("postgres") + _str("false") + b"".join(_str(str(d)) for d in e.deps) + _str(None)
        if not e.has_data:
            toc += bytes([ca.K_OFFSET_NO_DATA]) + bytes(8)
        elif offsets is None:
            toc += bytes([ca.K_OFFSET_POS_NOT_SET]) + bytes(8)
        else:
            toc += bytes([ca.K_OFFSET_POS_SET]) + offsets[e.dump_id].to_bytes(8, "little")
    out = bytearray(head + toc)
    starts = {}
    by_id = {e.dump_id: e for e in entries}
    for dump_id in order or [e.dump_id for e in entries if e.has_data]:
        e = by_id[dump_id]
        starts[dump_id] = len(out)
        if e.data is not None:
            out += bytes([ca.BLK_DATA]) + _int(dump_id)
            out += b"".join(_int(len(c)) + c for c in e.data) + _int(0)
        else:
            assert e.blobs is not None
            out += bytes([ca.BLK_BLOBS]) + _int(dump_id)
            for oid, chunks in e.blobs:
                out += _int(oid) + b"".join(_int(len(c)) + c for c in chunks) + _int(0)
            out += _int(0)
    return bytes(out), starts


def rows(n: int, width: int = 7) -> list[bytes]:
    return [f"{i}\t{'x' * (i % width)}\n".encode() for i in range(n)]


TEXT_ENTRIES = [
    Entry(1, "ENCODING"),
    Entry(2, "TABLE"),
    Entry(3, "TABLE", deps=[2]),
    Entry(10, "TABLE DATA", data=rows(5), deps=[2]),
    Entry(11, "TABLE DATA", data=[], deps=[3]),  # an empty table: header then the end marker
    # lengths whose headers hold zero runs: 256 -> 00 00 01 00 00, 512 -> 00 00 02 00 00
    Entry(300, "TABLE DATA", data=[b"a" * 256, b"b" * 512, b"c\n"], deps=[3]),
    Entry(12, "INDEX"),
]
BLOB_ENTRIES = [
    Entry(1, "ENCODING"),
    Entry(5, "TABLE DATA", data=rows(3)),
    Entry(6, "BLOBS", blobs=[(16414, [b"\x00\x01\x00\x00\x00\x00\x00\x00\x02"]), (16415, [b"\0" * 20]), (16416, [])]),
    Entry(7, "TABLE DATA", data=rows(2)),
]


def feed_split(data: bytes, cuts: list[int]) -> ca.OffsetRecorder:
    rec = ca.OffsetRecorder()
    bounds = [0, *cuts, len(data)]
    for a, b in itertools.pairwise(bounds):
        rec.feed(data[a:b])
    return rec


def expected_patches(entries: list[Entry], starts: dict[int, int], data: bytes) -> list[ca.Patch]:
    rec = feed_split(data, [])  # field positions come from the parse; checked against the file below
    return [ca.Patch(e.dump_id, rec.entries[e.dump_id].field_pos, starts[e.dump_id]) for e in entries if e.has_data]


@pytest.mark.parametrize("minor", [14, 15, 16])
@pytest.mark.parametrize(("entries", "compression"), [(TEXT_ENTRIES, 0), (BLOB_ENTRIES, 0), (TEXT_ENTRIES, 1)])
def test_offsets_at_every_split(entries: list[Entry], compression: int, minor: int) -> None:
    data, starts = build(entries, minor, compression)
    want = expected_patches(entries, starts, data)
    assert [p.offset for p in want] == list(starts.values())
    for cut in range(len(data) + 1):
        rec = feed_split(data, [cut])
        assert rec.patches() == want, cut
        assert rec.problem is None
    assert feed_split(data, list(range(1, len(data)))).patches() == want  # one byte at a time
    rng = random.Random(minor)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), 6))
        assert feed_split(data, cuts).patches() == want


@pytest.mark.parametrize("minor", [14, 15, 16])
def test_patched_file_equals_what_pg_dump_writes_to_a_file(tmp_path: Path, minor: int) -> None:
    for entries in (TEXT_ENTRIES, BLOB_ENTRIES):
        piped, starts = build(entries, minor)
        to_file, _ = build(entries, minor, offsets=starts)
        path = tmp_path / "archive.dump"
        path.write_bytes(piped)
        rec = feed_split(piped, [len(piped) // 3])
        fd = os.open(path, os.O_RDWR)
        try:
            assert ca.patch_offsets(fd, rec) == sum(e.has_data for e in entries)
        finally:
            os.close(fd)
        assert path.read_bytes() == to_file
        # a file pg_dump wrote with offsets: recorded positions agree, nothing left to patch
        again = feed_split(to_file, [7])
        assert again.patches() == [] and again.problem is None
        assert {i: e.offset for i, e in again.entries.items() if e.flag == ca.K_OFFSET_POS_SET} == starts


def test_chunk_header_with_four_zero_bytes() -> None:
    # 65536 -> 00 00 00 01 00; 2**24 would give 00 00 00 00 01: never five zeros before the end marker
    entries = [Entry(1, "TABLE DATA", data=[b"b" * 65536, b"x"]), Entry(2, "TABLE DATA", data=[b"c" * (1 << 24)])]
    data, starts = build(entries)
    want = {1: starts[1], 2: starts[2]}
    for cuts in ([], [starts[2] - 3], [starts[2] + 6 + 2], list(range(1000, len(data), 65521))):
        assert {p.dump_id: p.offset for p in feed_split(data, cuts).patches()} == want


def test_blocks_in_another_order_than_the_toc() -> None:
    data, starts = build(TEXT_ENTRIES, order=[300, 10, 11])
    assert {p.dump_id: p.offset for p in feed_split(data, [100]).patches()} == starts


def test_compressed_data_with_nul_bytes_is_walked_chunk_by_chunk() -> None:
    entries = [Entry(4, "TABLE DATA", data=[b"\0" * 9, b"x\0\0\0\0\0\0\x01\0\x05\0\0\0"]), Entry(5, "TABLE DATA", data=[b"y"])]
    data, starts = build(entries, minor=15, compression=3)
    assert {p.dump_id: p.offset for p in feed_split(data, [50]).patches()} == starts
    # the same bytes claiming "uncompressed" break the no-NUL rule: the scan sees a bad next block
    data, _ = build(entries, minor=15, compression=0)
    rec = feed_split(data, [])
    assert rec.patches() == [] and rec.problem and "unexpected block header" in rec.problem


def _replace(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


@pytest.mark.parametrize(("mutate", "problem"), [
    (lambda d: b"PGDMQ" + d[5:], "not a custom-format archive"),
    (lambda d: _replace(d, 6, bytes([13])), "archive version 1.13.0"),
    (lambda d: _replace(d, 6, bytes([17])), "archive version 1.17.0"),
    (lambda d: _replace(d, 10, bytes([3])), "unexpected int size"),  # the tar format's code
    (lambda d: d[:-1], "archive ends inside its data"),
    (lambda d: d[:40], "archive ends inside its header or TOC"),
    (lambda d: d + b"\x01", "archive ends inside its data"),
    (lambda d: d + bytes([ca.BLK_DATA]) + _int(99) + _int(0), "unexpected block header"),  # no such entry
    (lambda d: d + bytes([ca.BLK_DATA]) + _int(12) + _int(0), "unexpected block header"),  # an entry without data
    (lambda d: d + bytes([ca.BLK_DATA]) + _int(10) + _int(0), "unexpected block header"),  # a second block
    (lambda d: d + bytes([2]) + _int(3) + _int(0), "unexpected block header"),
])
def test_unexpected_input_gives_no_patches(mutate: Callable[[bytes], bytes], problem: str) -> None:
    data, _ = build(TEXT_ENTRIES)
    bad = mutate(data)
    for cuts in ([], [len(bad) // 2], list(range(1, len(bad), 97))):
        rec = feed_split(bad, cuts)
        assert rec.patches() == []
        assert rec.problem is not None and problem in rec.problem, rec.problem


def test_truncated_anywhere_but_a_block_boundary(tmp_path: Path) -> None:
    data, starts = build(TEXT_ENTRIES)
    boundaries = {*starts.values(), len(data)}
    for end in range(len(data) + 1):
        rec = feed_split(data[:end], [end // 2])
        if end in boundaries:
            assert rec.problem is None
        else:
            assert rec.patches() == [] and rec.problem, end


def test_patch_checks_the_file_first(tmp_path: Path) -> None:
    data, starts = build(TEXT_ENTRIES)
    rec = feed_split(data, [])
    path = tmp_path / "a.dump"
    for different in (build(TEXT_ENTRIES, offsets=starts)[0], _replace(data, starts[300] + 2, _int(12)[1:]), data + b"\0"):
        path.write_bytes(different)
        fd = os.open(path, os.O_RDWR)
        try:
            assert ca.patch_offsets(fd, rec) == 0
        finally:
            os.close(fd)
        assert path.read_bytes() == different
    fd = os.open(path, os.O_RDONLY)  # not writable: an OSError, no exception
    try:
        path.write_bytes(data)
        assert ca.patch_offsets(fd, rec) == 0
    finally:
        os.close(fd)


def test_unpatchable_stream_is_not_an_error() -> None:
    rec = ca.OffsetRecorder()
    rec.feed(b"-- PostgreSQL database dump\n")
    rec.feed(b"more text")
    assert rec.patches() == [] and rec.problem == "not a custom-format archive" and rec.size == 37


def test_long_tags_are_skipped_not_kept() -> None:
    data, _ = build([Entry(1, "X" * 5000), Entry(2, "TABLE DATA", data=rows(1))])
    rec = feed_split(data, [3000])
    assert rec.entries[1].desc == "..." and rec.entries[2].desc == "TABLE DATA" and len(rec.patches()) == 1


# --- the archive without its TABLE DATA blocks ---------------------------------------------------
def _without_table_data(data: bytes, entries: list[Entry], starts: dict[int, int]) -> bytes:
    bounds = sorted(starts.values()) + [len(data)]
    ends = {start: bounds[i + 1] for i, start in enumerate(bounds[:-1])}
    kept, pos = bytearray(), 0
    for e in entries:
        if e.desc == "TABLE DATA":
            kept += data[pos:starts[e.dump_id]]
            pos = ends[starts[e.dump_id]]
    return bytes(kept + data[pos:])


def _write_dropping(data: bytes, cuts: list[int]) -> tuple[bytes, ca.OffsetRecorder]:
    out = io.BytesIO()
    rec = ca.OffsetRecorder(drop_table_data=True)
    writer = ca.ArchiveWriter(out, rec)
    for a, b in itertools.pairwise([0, *cuts, len(data)]):
        writer.feed(data[a:b])
    writer.finish()
    return out.getvalue(), rec


@pytest.mark.parametrize("minor", [14, 16])
@pytest.mark.parametrize(("entries", "compression"), [(TEXT_ENTRIES, 0), (BLOB_ENTRIES, 0), (BLOB_ENTRIES, 1)])
def test_writer_leaves_out_table_data_at_every_split(tmp_path: Path, entries: list[Entry], compression: int, minor: int) -> None:
    data, starts = build(entries, minor, compression)
    want = _without_table_data(data, entries, starts)
    rng = random.Random(minor)
    splits = [[cut] for cut in range(len(data) + 1)] + [list(range(1, len(data)))]
    splits += [sorted(rng.sample(range(1, len(data)), 6)) for _ in range(30)]
    for cuts in splits:
        written, rec = _write_dropping(data, cuts)
        assert written == want, cuts
    path = tmp_path / "reduced.dump"
    path.write_bytes(written)
    fd = os.open(path, os.O_RDWR)
    try:
        assert ca.patch_offsets(fd, rec) == sum(e.has_data for e in entries)
    finally:
        os.close(fd)
    # The patched file is a valid archive: TABLE DATA entries without data, other blocks where the TOC says.
    patched = path.read_bytes()
    again = feed_split(patched, [])
    assert again.problem is None and again.patches() == []
    for e in entries:
        entry = again.entries[e.dump_id]
        if e.desc == "TABLE DATA":
            assert entry.flag == ca.K_OFFSET_NO_DATA
        elif e.has_data:
            assert entry.flag == ca.K_OFFSET_POS_SET and again.blocks[e.dump_id] == entry.offset
            assert patched[entry.offset] == ca.BLK_BLOBS


def test_writer_stops_when_the_layout_is_lost_after_a_drop() -> None:
    data, _ = build(TEXT_ENTRIES)
    bad = data + bytes([2]) + _int(3) + _int(0)  # an unknown block type after the TABLE DATA blocks
    with pytest.raises(ValueError, match="cannot follow the archive's layout: unexpected block header"):
        _write_dropping(bad, [len(data) - 5])
    text = b"-- PostgreSQL database dump\n" * 3  # not an archive: nothing dropped, written whole
    written, rec = _write_dropping(text, [5, 40])
    assert written == text and rec.problem == "not a custom-format archive"
