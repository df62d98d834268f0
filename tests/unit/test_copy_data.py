"""COPY text cut out of custom-format data blocks: the bulk path gives what a chunk-by-chunk walk gives."""

from __future__ import annotations

import random

import pytest

from saveit_backup.errors import IntegrityError
from saveit_backup.pg.copy_data import PIECE_BYTES, DataBlock, walk_chunks, whole_chunks


def header(size: int, int_size: int = 4) -> bytes:
    return b"\0" + size.to_bytes(int_size, "little")


def block(chunks: list[bytes], int_size: int = 4, dump_id: int = 3364) -> bytes:
    """A TABLE DATA block: type 1, the dump ID, the chunks, the zero length."""
    return (b"\x01" + header(dump_id, int_size) + b"".join(header(len(c), int_size) + c for c in chunks)
            + header(0, int_size))


def rows(rng: random.Random, count: int) -> list[bytes]:
    """Rows of COPY text; lengths 10, 266, 2570... put a newline byte into their chunk headers."""
    out = []
    for _ in range(count):
        size = rng.choice([1, 2, 9, 10, 11, 266, 2570, 2826, rng.randint(1, 300), rng.randint(1, 5000)])
        out.append(bytes(rng.choice(b"abc\t\\N019 ") for _ in range(size - 1)) + b"\n")
    return out


def load(data: bytes, pieces: list[int], int_size: int = 4) -> tuple[bytes, DataBlock]:
    b = DataBlock(int_size)
    out, pos = [], 0
    for size in pieces:
        out += b.feed(data[pos:pos + size])
        pos += size
    out += b.feed(data[pos:])
    out += b.finish()
    return b"".join(out), b


@pytest.mark.parametrize("seed", range(12))
def test_rows_in_pieces_of_any_size_come_out_whole(seed: int) -> None:
    rng = random.Random(seed)
    table = rows(rng, rng.randint(0, 3000))
    data = block(table)
    cuts = [rng.choice([1, 5, 6, 7, 4096, 65536, PIECE_BYTES, 3 * PIECE_BYTES]) for _ in range(rng.randint(0, 40))]
    text, b = load(data, cuts)
    assert text == b"".join(table)
    assert not b.walked or not table  # one chunk per row: the bulk path all along


def test_newlines_in_chunk_headers_do_not_fool_the_bulk_path() -> None:
    table = [b"x" * 9 + b"\n"] * 5000 + [b"\n" * 1 + b"y" * 265 + b"\n"] * 3 + [b"z" * 2569 + b"\n"] * 700  # 10, 266(+1), 2570
    data = block(table)
    assert whole_chunks(data[6:6 + 100_000], 4) is not None
    text, b = load(data, [])
    assert text == b"".join(table) and not b.walked


def test_chunks_that_are_not_rows_are_walked() -> None:
    stream = b"".join(rows(random.Random(7), 2000))
    rng = random.Random(8)
    chunks, pos = [], 0
    while pos < len(stream):  # rows split across chunks and several rows per chunk, as newer pg_dump writes
        size = rng.randint(1, 70_000)
        chunks.append(stream[pos:pos + size])
        pos += size
    text, b = load(block(chunks), [65536] * 40)
    assert text == stream and b.walked


def test_a_nul_byte_in_the_data_is_kept() -> None:
    table = [b"a\n", b"b\0\0\0\0\0c\n", b"d\n"] * 1000
    text, b = load(block(table), [])
    assert text == b"".join(table) and b.walked


def test_a_row_longer_than_the_window() -> None:
    table = [b"a\n", b"w" * (5 * PIECE_BYTES) + b"\n", b"b\n"]
    text, _ = load(block(table), [PIECE_BYTES // 3] * 20)
    assert text == b"".join(table)


@pytest.mark.parametrize("int_size", [4, 8])
def test_walk_and_bulk_agree(int_size: int) -> None:
    table = rows(random.Random(3), 500)
    data = block(table, int_size)[2 + int_size:]
    bulk = whole_chunks(data, int_size)
    assert bulk is not None
    assert (bytes(bulk[0]), bulk[1], bulk[2]) == (bytes(walk_chunks(data, int_size)[0]), len(data), True)


def test_a_truncated_block_raises() -> None:
    data = block(rows(random.Random(4), 50))
    b = DataBlock(4)
    b.feed(data[:-3])
    with pytest.raises(IntegrityError, match="ends early"):
        b.finish()


def test_bytes_after_the_end_marker_raise() -> None:
    b = DataBlock(4)
    b.feed(block([b"a\n"]))
    b.finish()
    with pytest.raises(IntegrityError, match="after the end"):
        b.feed(b"\x01")


def test_a_negative_length_raises() -> None:
    with pytest.raises(IntegrityError, match="negative chunk length"):
        load(b"\x01" + header(1) + b"\x01\x02\0\0\0ab", [])
