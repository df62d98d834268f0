"""The parallel COPY loader over fake connections: what each connection receives, and how failures end."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from saveit_backup.errors import PgToolError
from saveit_backup.ops.copy_loader import CopyText, load_copy_stream, widen_send_buffer

PREAMBLE = (b"--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\n\nSET client_encoding = 'UTF8';\n"
            b"SELECT pg_catalog.set_config('search_path', '', false);\n\n")


def table(schema: str, name: str, rows: list[bytes]) -> bytes:
    head = f"--\n-- Data for Name: {name}; Type: TABLE DATA; Schema: {schema}; Owner: postgres\n--\n\n".encode()
    return head + f"COPY {schema}.{name} (a, b) FROM stdin;\n".encode() + b"".join(rows) + b"\\.\n\n\n"


class FakeCopy:
    def __init__(self, conn: FakeConn, sql: str, cursor: FakeCursor) -> None:
        self.conn, self.sql, self.cursor = conn, sql, cursor

    def __enter__(self) -> FakeCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cursor.rowcount = sum(block.count(b"\n") for sql, block in self.conn.blocks if sql == self.sql and block)

    def write(self, block: bytes | bytearray) -> None:
        if self.conn.fail_on and self.conn.fail_on in bytes(block):
            raise RuntimeError("ERROR:  invalid input syntax for type integer: \"x\"\nCONTEXT: COPY t, line 3")
        self.conn.blocks.append((self.sql, bytes(block)))
        time.sleep(self.conn.write_seconds)  # a server busy with the block: the next one goes to another writer


class FakeCursor:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn
        self.rowcount = -1

    def copy(self, sql: bytes) -> FakeCopy:
        self.conn.copies.append(sql.decode("latin-1"))
        return FakeCopy(self.conn, sql.decode("latin-1"), self)


class FakeConn:
    def __init__(self, fail_on: bytes = b"", write_seconds: float = 0.0) -> None:
        self.write_seconds = write_seconds
        self.statements: list[str] = []
        self.copies: list[str] = []
        self.blocks: list[tuple[str, bytes]] = []
        self.fail_on = fail_on

    def execute(self, sql: bytes) -> None:  # the loader passes the archive's bytes
        self.statements.append(sql.decode("latin-1"))

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def rows(prefix: str, n: int) -> list[bytes]:
    return [f"{i}\t{prefix}-{i}\n".encode() for i in range(n)]


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_each_table_is_split_across_every_connection_at_line_ends(chunk: int) -> None:
    big, small = rows("big", 5000), rows("small", 3)
    stream = PREAMBLE + table("public", "big", big) + table("audit", "small", small) + b"--\n-- dump complete\n--\n\n\\unrestrict abc\n"
    conns = [FakeConn(write_seconds=0.001), FakeConn(write_seconds=0.001)]
    counts = load_copy_stream(chunked(stream, chunk), conns, block_bytes=1000)
    assert counts == {("public", "big"): 5000, ("audit", "small"): 3}
    for conn in conns:  # settings on every connection, in order; comments and \restrict skipped
        assert conn.statements == ["SET client_encoding = 'UTF8';", "SELECT pg_catalog.set_config('search_path', '', false);"]
        assert conn.copies == ["COPY public.big (a, b) FROM stdin;", "COPY audit.small (a, b) FROM stdin;"]
        assert all(block.endswith(b"\n") and len(block) < 1100 for _, block in conn.blocks)
    got = sorted(line for conn in conns for sql, block in conn.blocks if "big" in sql for line in block.splitlines(keepends=True))
    assert got == sorted(big)  # every row exactly once
    assert all(any("big" in sql for sql, _ in conn.blocks) for conn in conns)  # both connections loaded it (each free in turn)


def test_an_empty_table_and_a_row_that_looks_like_the_end_marker() -> None:
    tricky = [b"1\t\\\\.\n", b"2\tx\\.y\n"]  # a backslash in COPY text is doubled: only a bare \. line ends the data
    stream = PREAMBLE + table("public", "empty", []) + table("public", "tricky", tricky)
    conns = [FakeConn(), FakeConn(), FakeConn()]
    counts = load_copy_stream(chunked(stream, 3), conns, block_bytes=4)
    assert counts == {("public", "empty"): 0, ("public", "tricky"): 2}
    assert sorted(b for c in conns for sql, b in c.blocks if "tricky" in sql) == sorted(tricky)


def test_a_failing_copy_stops_the_load_with_the_servers_first_line() -> None:
    stream = PREAMBLE + table("public", "t", rows("ok", 50) + [b"x\tbad\n"] + rows("later", 50)) + table("public", "u", rows("u", 5))
    conns = [FakeConn(fail_on=b"x\tbad"), FakeConn(fail_on=b"x\tbad")]
    with pytest.raises(PgToolError, match=r"COPY failed: ERROR:  invalid input syntax for type integer: \"x\" \(hint"):
        load_copy_stream(chunked(stream, 64), conns, block_bytes=64)
    assert not any("public.u" in sql for c in conns for sql in c.copies)  # nothing after the failed table


@pytest.mark.parametrize("cut", [b"COPY public.t (a, b) FROM stdin;\n1\t2\n", b"SET x = "])
def test_output_that_stops_early_is_an_error(cut: bytes) -> None:
    stream = PREAMBLE + b"--\n-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: postgres\n--\n\n" + cut
    with pytest.raises(PgToolError, match="pg_restore output ended inside"):
        load_copy_stream([stream], [FakeConn()])


def test_pg_restore_failure_reports_its_error_line() -> None:
    script = "printf 'SET a = 1;\\n'; echo 'pg_restore: error: could not read from input file: end of file' >&2; exit 1"
    with pytest.raises(PgToolError, match=r"pg_restore failed: pg_restore: error: could not read from input file: end of file \(hint"):
        failing = CopyText(["sh", "-c", script], {})
        failing.end_input()
        b"".join(failing.chunks())
    echo = CopyText([sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper())"], {})
    assert echo.feed(b"set a = 1;\n") and echo.feed(b"set b = 2;\n")
    echo.end_input()
    assert b"".join(echo.chunks()) == b"SET A = 1;\nSET B = 2;\n"


class AbortRaisingCopy(FakeCopy):
    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:  # aborting fails on its own: a server error already pending, a lost connection
            raise OSError("server closed the connection unexpectedly")
        super().__exit__(*exc)


class AbortRaisingCursor(FakeCursor):
    def copy(self, sql: bytes) -> FakeCopy:
        super().copy(sql)
        return AbortRaisingCopy(self.conn, sql.decode("latin-1"), self)


class AbortRaises(FakeConn):
    def cursor(self) -> FakeCursor:
        return AbortRaisingCursor(self)


def test_source_failing_inside_a_table_ends_every_writer_even_when_the_abort_raises() -> None:
    def source() -> Iterator[bytes]:
        yield PREAMBLE + b"--\n-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: postgres\n--\n\n"
        yield b"COPY public.t (a, b) FROM stdin;\n" + b"".join(rows("r", 400))
        raise RuntimeError("decode failed")

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            load_copy_stream(source(), [AbortRaises(), AbortRaises()], block_bytes=256)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "load_copy_stream hung"
    assert len(outcome) == 1 and str(outcome[0]) == "decode failed"


def test_a_failing_block_stops_reading_before_the_tables_end() -> None:
    consumed = 0

    def source() -> Iterator[bytes]:
        nonlocal consumed
        for chunk in chunked(PREAMBLE + table("public", "t", [b"x\tbad\n"] + rows("later", 20000)), 64):
            consumed += len(chunk)
            yield chunk

    with pytest.raises(PgToolError, match="COPY failed"):
        load_copy_stream(source(), [FakeConn(fail_on=b"x\tbad"), FakeConn(fail_on=b"x\tbad")], block_bytes=64)
    assert consumed < 20000  # of about 280 kB


def test_names_outside_utf8_pass_as_the_archives_bytes() -> None:
    name = "café".encode("latin-1")  # a LATIN1 database's table: pg_restore prints the name in that encoding
    stream = (PREAMBLE.replace(b"UTF8", b"LATIN1")
              + b"--\n-- Data for Name: " + name + b"; Type: TABLE DATA; Schema: public; Owner: x\n--\n\n"
              + b"COPY public." + name + b" (a) FROM stdin;\n1\n2\n\\.\n")
    conn = FakeConn()
    counts = load_copy_stream([stream], [conn])
    assert conn.copies == ["COPY public.café (a) FROM stdin;"] and conn.statements[0] == "SET client_encoding = 'LATIN1';"
    assert list(counts.values()) == [2]  # keyed by a lossy name: the manifest's check counts such a table itself


def test_copy_connections_get_a_large_send_buffer() -> None:
    a, b = socket.socketpair()
    with a, b:
        class Conn:
            def fileno(self) -> int:
                return a.fileno()

        before = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        widen_send_buffer(Conn(), 1 << 20)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > before  # the kernel may cap it, never below
        a.sendall(b"still open")  # the duplicate was closed, not the connection's socket
        assert b.recv(16) == b"still open"


def test_batched_read_of_a_small_pipe_does_not_wait_for_more_than_it_holds() -> None:
    from saveit_backup.ops.copy_loader import _read_batched

    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 64 << 10)  # a pipe that stayed small: less than the batch size fits
    data = os.urandom(200 << 10)

    def write() -> None:
        with os.fdopen(w, "wb") as out:
            out.write(data)  # blocks until the reader made room

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = bytearray()
    with os.fdopen(r, "rb") as inp:
        while piece := _read_batched(inp.fileno()):
            got += piece
    writer.join(5)
    assert bytes(got) == data
