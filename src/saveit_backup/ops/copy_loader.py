"""Load the TABLE DATA of a custom-format archive over N connections, every table split across all of them.

``pg_restore -j N`` loads one table per worker, so a database dominated by one big table loads on one
server backend while the others idle.  Here ``pg_restore --data-only -f -`` turns the selected TABLE DATA
entries into plain SQL with COPY blocks (pg_restore reads the archive, in C, whatever its compression),
and ``load_copy_stream`` cuts each table's COPY text into blocks of about 1 MiB at line ends and hands
them in turn to N writer threads, each running its own ``COPY ... FROM STDIN`` of that table on its own
connection.  COPY's text format escapes backslashes, so the line ``\\.`` only ever ends a block.

Contract:
* the tables exist and are empty (pre-data restored); each COPY commits on its own (autocommit), as a
  ``pg_restore -j`` worker's does;
* rows land in the table in block order per connection, not in the archive's order;
* the returned row counts are COPY's command tags summed per table, keyed by (schema, name) as the
  archive's "Data for Name" comment gives them;
* SQL outside COPY blocks (pg_restore's session settings) runs on every connection, in order; psql
  meta-commands (``\\restrict``) and comments are skipped;
* the first failure (a writer's, or pg_restore's) stops the load and is raised as ``PgToolError``.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import queue
import re
import select
import shutil
import socket
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from saveit_backup.errors import PgToolError

log = logging.getLogger(__name__)

BLOCK_BYTES = 1 << 20
SEND_BUFFER = 4 << 20
BATCH_BYTES = 256 << 10  # read pg_restore's output once this much waits in the pipe (or at its end)
BATCH_WAIT = 0.001
BATCH_MAX_WAIT = 0.02
QUEUE_DEPTH = 4  # blocks queued per writer: memory stays under N * (QUEUE_DEPTH + 2) MiB
_END = b"\\.\n"
_COPY_LINE = re.compile(rb"COPY .+ FROM stdin;")
_DATA_COMMENT = re.compile(rb"-- Data for Name: (.*); Type: TABLE DATA; Schema: (.*); Owner: ")


@dataclass
class _Copy:
    """One table's COPY as every writer runs it: each takes the next block from ``blocks`` when it is ready
    for one (no writer waits behind a slower one), through one ``None`` per writer; writers report
    (rows, error) on ``done``."""

    sql: bytes
    key: tuple[str, str]
    blocks: queue.Queue[object]
    done: queue.Queue[tuple[int, BaseException | None]] = field(default_factory=queue.Queue)


class _Stopped(Exception):
    """The dispatcher gave up: leave any COPY under way (psycopg aborts it) and end the thread."""


class WriterFailed(Exception):
    """A writer reported an error: stop dispatching (``load_copy_stream`` raises the error)."""


class _Writer:
    """A connection and the thread that feeds it: SQL strings and ``_Copy`` jobs in its inbox, a job's data
    blocks from the job's shared queue until a ``None``; ``_STOP`` (in either) ends the thread, aborting a
    COPY under way (whatever the abort raises).  After an error the writer goes on taking the job's blocks
    through its ``None``, so the dispatcher never blocks, and reports the error for every job.  SQL is bytes
    in the archive's encoding, which pg_restore's own ``SET client_encoding`` makes the session's."""

    def __init__(self, conn: Any, index: int) -> None:
        self.conn = conn
        self.inbox: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name=f"copy-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self._next()
                if isinstance(item, bytes):
                    if self.error is None:
                        try:
                            self.conn.execute(item)
                        except Exception as exc:  # reported with the next job
                            self.error = exc
                elif isinstance(item, _Copy):
                    rows = self._copy(item)
                    item.done.put((rows, self.error))
        except _Stopped:
            return

    def _next(self, source: queue.Queue[object] | None = None) -> object:
        item = (source or self.inbox).get()
        if item is _STOP:
            self.stopped = True
            raise _Stopped
        return item

    def _copy(self, job: _Copy) -> int:
        ended = False
        if self.error is None:
            try:
                cur = self.conn.cursor()
                with cur.copy(job.sql) as copy:
                    while (block := self._next(job.blocks)) is not None:
                        copy.write(block)  # type: ignore[arg-type]  # a bytearray
                    ended = True
                return max(0, int(cur.rowcount))
            except _Stopped:
                raise
            except Exception as exc:
                if self.stopped:  # the abort raised an error of its own (the server's, a lost connection)
                    raise _Stopped from exc
                self.error = exc
        while not ended:  # this job's blocks, through a None
            ended = self._next(job.blocks) is None
        return 0


_STOP = object()


class CopyLoader:
    """The push side: ``sql`` for every connection, then per table ``begin``, ``rows`` (blocks that end at
    line ends, each taken by the first writer ready for it) and ``end``; ``close`` stops the writers and raises the first
    failure.  ``rows`` and ``end`` raise ``WriterFailed`` as soon as a writer failed (``close`` says why).
    ``on_table(key)`` is called once a table's COPY committed on every connection."""

    def __init__(self, connections: list[Any], on_table: Callable[[tuple[str, str]], None] | None = None) -> None:
        self.writers = [_Writer(conn, i) for i, conn in enumerate(connections)]
        self.on_table = on_table
        self.counts: dict[tuple[str, str], int] = {}
        self.job: _Copy | None = None

    def sql(self, statement: bytes) -> None:
        for w in self.writers:
            w.inbox.put(statement)

    def begin(self, copy_sql: bytes, key: tuple[str, str]) -> None:
        self.job = _Copy(copy_sql, key, queue.Queue(maxsize=QUEUE_DEPTH * len(self.writers)))
        for w in self.writers:
            w.inbox.put(self.job)

    def rows(self, block: bytes | bytearray) -> None:
        if any(w.error is not None for w in self.writers):  # stop reading at once, not at the table's end
            raise WriterFailed
        assert self.job is not None
        self.job.blocks.put(block)

    def end(self) -> None:
        job, self.job = self.job, None
        assert job is not None
        for _ in self.writers:
            job.blocks.put(None)
        results = [job.done.get() for _ in self.writers]
        if any(err is not None for _, err in results):
            raise WriterFailed
        self.counts[job.key] = self.counts.get(job.key, 0) + sum(rows for rows, _ in results)
        if self.on_table is not None:
            self.on_table(job.key)

    def close(self) -> dict[tuple[str, str], int]:
        if self.job is not None:  # stopped inside a table: its writers wait on its blocks
            for _ in self.writers:
                while True:
                    try:
                        self.job.blocks.put_nowait(_STOP)
                        break
                    except queue.Full:
                        with contextlib.suppress(queue.Empty):
                            self.job.blocks.get_nowait()  # a block nobody will load now
        for w in self.writers:
            w.inbox.put(_STOP)
        for w in self.writers:
            w.thread.join()
        for w in self.writers:
            if w.error is not None:
                raise PgToolError(f"COPY failed: {_first_line(w.error)}") from w.error
        return self.counts


def load_copy_stream(chunks: Iterable[bytes], connections: list[Any], block_bytes: int = BLOCK_BYTES,
                     on_table: Callable[[tuple[str, str]], None] | None = None) -> dict[tuple[str, str], int]:
    """Run pg_restore's plain-SQL output (``chunks``) over ``connections``; return rows per table."""
    loader = CopyLoader(connections, on_table)
    source = iter(chunks)
    try:
        _dispatch(source, loader, block_bytes)
    except WriterFailed:
        pass
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()  # stops pg_restore if the load ended early
        counts = loader.close()
    return counts


def _is_noise(line: bytes) -> bool:
    """A line of pg_restore's plain output that is no SQL: blank, a comment, a psql meta-command (``\\restrict``)."""
    return not line.strip() or line.startswith(b"--") or line.startswith(b"\\")


def sql_statements(lines: Iterable[bytes]) -> Iterator[bytes]:
    """The SQL statements in lines of pg_restore's plain output outside COPY data: comments, blank lines
    and psql meta-commands (``\\restrict``) skipped, a statement's lines joined through its ``;``."""
    statement: list[bytes] = []
    for line in lines:
        if not statement and _is_noise(line):
            continue
        statement.append(line)
        if line.rstrip().endswith(b";"):
            yield b"\n".join(statement)
            statement.clear()
    if statement:
        raise PgToolError("pg_restore output ended inside a statement")


def _dispatch(chunks: Iterator[bytes], loader: CopyLoader, block_bytes: int) -> None:
    pending = bytearray()
    statement: list[bytes] = []
    key = ("", "")

    def more() -> bool:
        for chunk in chunks:
            if chunk:
                pending.extend(chunk)
                return True
        return False

    while True:
        # outside COPY: one text line at a time
        nl = pending.find(b"\n")
        if nl < 0:
            if more():
                continue
            if pending.strip() or statement:
                raise PgToolError("pg_restore output ended inside a statement")
            return
        line = bytes(pending[:nl])
        del pending[:nl + 1]
        if m := _DATA_COMMENT.match(line):  # the key only matches the manifest's names; an odd one is counted later
            schema, name = (g.decode("utf-8", "replace") for g in m.group(2, 1))
            key = (schema if schema != "-" else "", name)
        if not statement and _is_noise(line):
            continue
        if not statement and _COPY_LINE.fullmatch(line):
            loader.begin(line, key)
            _copy_blocks(pending, more, loader, block_bytes)
            loader.end()
            continue
        statement.append(line)
        if line.rstrip().endswith(b";"):
            loader.sql(b"\n".join(statement))
            statement.clear()


def _copy_blocks(pending: bytearray, more: Callable[[], bool], loader: CopyLoader, block_bytes: int) -> None:
    """Send the COPY data at the start of ``pending`` through its ``\\.`` line, in blocks of at most
    ``block_bytes`` (or one longer line) ending at line ends; leave what follows in ``pending``."""
    scanned = 0  # pending[:scanned] holds no end line
    while True:
        if pending.startswith(_END):  # pending always starts at a line start
            del pending[:len(_END)]
            return
        end = pending.find(b"\n" + _END, max(0, scanned - len(_END)))
        if 0 <= end < block_bytes:
            loader.rows(pending[:end + 1])
            del pending[:end + 1 + len(_END)]
            return
        scanned = len(pending) if end < 0 else end
        cut = pending.rfind(b"\n", 0, block_bytes) if len(pending) >= block_bytes else -1
        if cut < 0 and len(pending) >= block_bytes:
            cut = pending.find(b"\n", block_bytes)  # one line longer than a block
        if cut >= 0:
            loader.rows(pending[:cut + 1])
            del pending[:cut + 1]
            scanned = max(0, scanned - (cut + 1))
        elif not more():
            raise PgToolError("pg_restore output ended inside COPY data")


class TableRows:
    """One table's COPY text in pieces of any size (``add``) to ``loader.rows`` in blocks that end at line
    ends; ``finish`` sends the rest, without the ``\\.`` line that pg_dump writes at the end of the data
    (the end of the COPY is the protocol's CopyDone).  The last block is held back until then."""

    def __init__(self, loader: CopyLoader) -> None:
        self.loader = loader
        self.pending = bytearray()  # a line not ended yet
        self.held: bytes | bytearray | None = None

    def _send(self, block: bytes | bytearray) -> None:
        if self.held is not None:
            self.loader.rows(self.held)
        self.held = block

    def add(self, piece: bytes | bytearray) -> None:
        if not self.pending and piece.endswith(b"\n"):
            self._send(piece)
            return
        self.pending += piece
        cut = self.pending.rfind(b"\n")
        if cut >= 0:
            self._send(self.pending[:cut + 1])
            del self.pending[:cut + 1]

    def finish(self) -> None:
        if self.pending:
            self._send(bytes(self.pending))  # a last line without its newline: COPY says what is wrong
            self.pending.clear()
        last = self.held or b""
        tail = last.rstrip(b"\n")
        if tail.endswith(b"\\.") and (len(tail) == 2 or tail[-3:-2] == b"\n"):
            last = last[:len(tail) - 2]
        if last:
            self.loader.rows(last)
        self.held = None


def _read_batched(fd: int) -> bytes:
    """Up to ``BLOCK_BYTES`` from the pipe ``fd``, waiting (in steps of ``BATCH_WAIT`` seconds) until
    ``BATCH_BYTES`` or half the pipe's capacity are there, or ``BATCH_MAX_WAIT`` passed with anything there,
    or the writer is gone; b"" at the end.  pg_restore writes its output in 4 KiB pieces: a blocking read
    would wake up for each of them (about 90,000 reads, and as many GIL hand-offs, per GB)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    available = array.array("i", [0])
    try:  # the pipe may have stayed small (fs.pipe-max-size, pipe-user-pages-soft): never wait for more than fits
        enough = min(BATCH_BYTES, fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) // 2)
    except OSError:
        enough = 1
    waited = 0.0
    while True:
        events = poller.poll(0)
        if events and events[0][1] & (select.POLLHUP | select.POLLERR):
            return os.read(fd, BLOCK_BYTES)  # the writer closed: what is left, then b""
        fcntl.ioctl(fd, termios.FIONREAD, available)
        if available[0] >= enough or (available[0] and waited >= BATCH_MAX_WAIT):
            return os.read(fd, BLOCK_BYTES)
        time.sleep(BATCH_WAIT)
        waited += BATCH_WAIT


def widen_send_buffer(conn: Any, size: int = SEND_BUFFER) -> None:
    """A socket send buffer of ``size`` for a COPY connection (the kernel caps it at net.core.wmem_max).

    A Unix socket only wakes a writer waiting to send once three quarters of what it buffered were read: with
    the default 208 KiB the server has about 50 KiB left when the writer is woken, and on busy cores it runs
    dry (waits for ClientRead) before the writer gets the CPU and the GIL back; with 4 MiB it has 1 MiB."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError as exc:
        log.debug("send buffer left as it is: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CopyText:
    """``pg_restore --data-only -f -`` as the source of COPY text: ``chunks()`` yields its output and, at its
    end, raises pg_restore's error line if it failed.  The archive is given on stdin with ``feed`` (in order,
    from its first byte) and ``end_input``; pg_restore reads it once, front to back, so the listed entries
    must be in the archive's order."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        stdbuf = shutil.which("stdbuf")
        if stdbuf:  # pg_restore reads stdin through stdio's 4 KiB buffer: 1 MiB instead, 250 times fewer read calls
            cmd = [stdbuf, "-i1M", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:  # 1 MiB pipes: 16 times fewer wake-ups than the default 64 KiB
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, BLOCK_BYTES)  # type: ignore[union-attr]
            except OSError:
                pass
        self.tail: deque[str] = deque(maxlen=50)
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.tail.extend(line.decode(errors="replace").rstrip() for line in self.proc.stderr)

    def feed(self, data: bytes) -> bool:
        """Pass archive bytes on; False once pg_restore stopped reading (it failed, or the load did)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            return True
        except (BrokenPipeError, ValueError):
            return False

    def end_input(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def chunks(self) -> Iterator[bytes]:
        assert self.proc.stdout is not None
        at_end = False
        try:
            while chunk := _read_batched(self.proc.stdout.fileno()):
                yield chunk
            at_end = True
        finally:
            if not at_end:
                self.kill()  # closed early: the load stopped
            rc = self.proc.wait()
            self.reader.join()
        if rc != 0:
            errors = [ln for ln in self.tail if "error:" in ln] or [ln for ln in self.tail if ln] or [f"exit status {rc}"]
            raise PgToolError(f"pg_restore failed: {errors[-1]}")
