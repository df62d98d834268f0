"""Data offsets for a custom-format archive (``pg_dump -Fc``) that pg_dump wrote to a pipe.

pg_dump writing to a file seeks back at the end and rewrites the table of contents with the file
position of every entry's data block; writing to a pipe it cannot, so each entry keeps the flag
"position not set" and ``pg_restore -j`` workers scan the archive for their blocks.  ``OffsetRecorder``
watches the archive stream once, in whatever chunks it is written, and ``patch_offsets`` then writes
the positions into the table of contents of the written file, in place (same size).

Layout (archive versions 1.14 to 1.16: pg_dump 12 to 18).  An *int* is a sign byte (non-zero means
negative) then ``int_size`` bytes, least significant first; a *string* is an int length (negative:
NULL) then that many bytes.

* header: ``PGDMP``, major, minor, revision, int_size, off_size, format (1 = custom); compression:
  from 1.15 one byte (0 none, 1 gzip, 2 lz4, 3 zstd), before that an int level (0 = none, else gzip);
  seven ints (creation time); strings: database name, server version, pg_dump version.
* table of contents: an int count, then per entry: ints dump ID and "had dumper"; strings table OID,
  OID, tag, desc; int section; strings defn, drop statement, copy statement, namespace, tablespace,
  table AM; from 1.16 an int relkind; strings owner, "with OIDs"; dependency strings ending with a
  NULL string; the data offset: a flag byte (1 not set, 2 set, 3 no data) then ``off_size`` bytes.
* data blocks to the end of the file: a block type byte (1 data, 3 large objects), the entry's dump
  ID as an int; data: chunks (int length, bytes) ending with length 0; large objects: per object an
  int OID then chunks as above, ending with OID 0.  An entry's offset is the position of its type byte.

Skipping data chunk by chunk costs about 0.4 us per chunk in Python, and an uncompressed archive has
one chunk per row.  In an uncompressed archive a data block holds COPY text (or INSERT statements),
which never contains a NUL byte; a chunk header of non-zero length has at most ``int_size`` zero bytes
in a row; so the block's end marker is the first run of ``int_size + 1`` zero bytes after the block
header, found with ``bytes.find``.  Large objects and compressed archives are walked chunk by chunk.

With ``drop_table_data`` the recorder also marks the TABLE DATA blocks, and ``ArchiveWriter`` writes the
archive without them (for a restore whose table data goes elsewhere, see ``ops.copy_loader``); the
patches then set those entries to "no data" and the other blocks' offsets to their new positions.

Anything unexpected (unknown version, truncated stream, a block for an unknown entry) leaves the
recorder without patches and a ``problem``: the archive stays as written, which pg_restore reads anyway.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

MAGIC = b"PGDMP"
SUPPORTED_VERSIONS = {(1, 14), (1, 15), (1, 16)}
FORMAT_CUSTOM = 1
BLK_DATA = 1
BLK_BLOBS = 3
K_OFFSET_POS_NOT_SET = 1
K_OFFSET_POS_SET = 2
K_OFFSET_NO_DATA = 3
COMPRESSION_NONE = 0
SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA = 2, 3, 4
_NAME_LIMIT = 1024  # tags and descs longer than this are skipped, not kept
_COPY_LIMIT = 1 << 20  # COPY statements (one per table, with its column names) up to this are kept

# Requests from the parser coroutine to the feeder: read N bytes (sent back), skip N bytes, or consume
# through the first run of N zero bytes.
_READ, _SKIP, _SCAN = 0, 1, 2
_Request = tuple[int, int]
_Parser = Generator[_Request, bytes | None, None]


class _Unusable(Exception):
    """The stream is not an archive this module patches; the message says why."""


@dataclass
class TocEntry:
    dump_id: int
    desc: str
    tag: str
    field_pos: int  # file position of the offset flag byte
    flag: int  # K_OFFSET_* as written
    offset: int  # as written (meaningful with K_OFFSET_POS_SET)
    namespace: str = ""  # the schema ("" for objects outside one)
    section: int = 0  # SECTION_* (pre-data 2, data 3, post-data 4)
    deps: tuple[int, ...] = ()  # dump IDs this entry depends on
    copy_stmt: bytes = b""  # TABLE DATA: "COPY ... FROM stdin;\n" in the archive's encoding (b"" if none or too long)


@dataclass(frozen=True)
class Patch:
    dump_id: int
    field_pos: int
    offset: int
    flag: int = K_OFFSET_POS_SET


class OffsetRecorder:
    """Feed it the archive bytes in order (``feed``); ``patches()`` then lists the offsets to write.

    Memory stays constant: only fields of a few bytes (and tags up to 1 KiB) are buffered.  ``feed``
    never raises: a problem stops the recording and is kept in ``problem``.
    """

    def __init__(self, drop_table_data: bool = False) -> None:
        self.drop_table_data = drop_table_data
        self.dropped: list[tuple[int, int]] = []  # stream ranges [start, end) of the TABLE DATA blocks, in order
        self.drop_from: int | None = None  # start of the TABLE DATA block being read
        self.version: tuple[int, int, int] | None = None
        self.int_size = 4
        self.off_size = 8
        self.compression = COMPRESSION_NONE
        self.entries: dict[int, TocEntry] = {}
        self.blocks: dict[int, int] = {}  # dump ID -> position of its block type byte
        self.block_at: dict[int, int] = {}  # the same, position -> dump ID
        self.problem: str | None = None
        self.toc_end: int | None = None  # position after the table of contents, once read
        self.size = 0  # bytes fed
        self._pos = 0  # position after the bytes of the request just served (read by the parser)
        self._buf = bytearray()  # a READ request's bytes so far
        self._left = 0  # a SKIP request's bytes still to skip
        self._zrun = 0  # a SCAN request's zero bytes at the end of the last chunk
        self._at_block_boundary = False  # the parser waits for a block header (end of file is fine here)
        self._gen: _Parser | None = self._parse()
        self._req: _Request = next(self._gen)
        self._start_request()

    # --- feeding -----------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self._gen is None:
            self.size += len(chunk)
            return
        try:
            self._feed(chunk)
        except _Unusable as exc:
            self._stop(str(exc))
        except Exception as exc:  # a bug here must not fail a restore
            self._stop(f"recorder error: {exc!r}")

    def _stop(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
        if self._gen is not None:
            self._gen.close()
        self._gen = None

    def _start_request(self) -> None:
        kind, n = self._req
        if kind == _SKIP:
            self._left = n
        elif kind == _SCAN:
            self._zrun = 0

    def _resume(self, value: bytes | None) -> None:
        assert self._gen is not None
        self._req = self._gen.send(value)
        self._start_request()

    def _feed(self, chunk: bytes) -> None:
        base = self.size
        self.size += len(chunk)
        end = len(chunk)
        i = 0
        while True:
            kind, n = self._req
            if kind == _SKIP:
                take = min(self._left, end - i)
                i += take
                self._left -= take
                if self._left:
                    return
                self._pos = base + i
                self._resume(None)
            elif i == end:
                return
            elif kind == _READ:
                if not self._buf and end - i >= n:
                    value = chunk[i:i + n]
                    i += n
                else:
                    take = min(n - len(self._buf), end - i)
                    self._buf += chunk[i:i + take]
                    i += take
                    if len(self._buf) < n:
                        return
                    value = bytes(self._buf)
                    self._buf.clear()
                self._pos = base + i
                self._resume(value)
            else:  # _SCAN for n zero bytes
                zeros = bytes(n)
                if self._zrun:  # a run that began in an earlier chunk
                    need = n - self._zrun
                    head = chunk[i:i + need]
                    if head == zeros[:len(head)]:
                        if len(head) < need:
                            self._zrun += len(head)
                            return
                        i += need
                        self._pos = base + i
                        self._resume(None)
                        continue
                    self._zrun = 0
                q = chunk.find(zeros, i)
                if q >= 0:
                    i = q + n
                    self._pos = base + i
                    self._resume(None)
                    continue
                tail = chunk[max(i, end - (n - 1)):]
                self._zrun = len(tail) - len(tail.rstrip(b"\0"))
                return

    # --- the format --------------------------------------------------------------------
    def _int(self) -> Generator[_Request, bytes | None, int]:
        raw = yield (_READ, 1 + self.int_size)
        assert raw is not None
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def _str(self, keep: bool = False) -> Generator[_Request, bytes | None, str | None]:
        raw = yield from self._bytes(_NAME_LIMIT if keep else 0)
        if raw is None:
            return None
        return raw.decode("utf-8", "replace") if keep else ""

    def _bytes(self, limit: int) -> Generator[_Request, bytes | None, bytes | None]:
        """A string's bytes if it has at most ``limit`` of them (longer: b"..."), None for NULL."""
        n = yield from self._int()
        if n < 0:
            return None
        if 0 < n <= limit:
            raw = yield (_READ, n)
            assert raw is not None
            return bytes(raw)
        yield (_SKIP, n)
        return b"" if n == 0 else b"..."

    def _chunks(self) -> Generator[_Request, bytes | None, None]:
        """Skip chunks (int length, bytes) through the zero length that ends them."""
        while True:
            n = yield from self._int()
            if n == 0:
                return
            if n < 0:
                raise _Unusable(f"negative chunk length at {self._pos}")
            yield (_SKIP, n)

    def _parse(self) -> _Parser:
        head = yield (_READ, 8)
        assert head is not None
        if head[:5] != MAGIC:
            raise _Unusable("not a custom-format archive")
        major, minor, rev = head[5], head[6], head[7]
        self.version = (major, minor, rev)
        if (major, minor) not in SUPPORTED_VERSIONS:
            raise _Unusable(f"archive version {major}.{minor}.{rev} is not one this module knows")
        sizes = yield (_READ, 3)
        assert sizes is not None
        self.int_size, self.off_size, fmt = sizes
        if not 1 <= self.int_size <= 8 or not 1 <= self.off_size <= 8 or fmt != FORMAT_CUSTOM:
            raise _Unusable(f"unexpected int size {self.int_size}, offset size {self.off_size} or format {fmt}")
        if minor >= 15:
            algorithm = yield (_READ, 1)
            assert algorithm is not None
            self.compression = algorithm[0]
        else:
            level = yield from self._int()
            self.compression = COMPRESSION_NONE if level == 0 else 1
        for _ in range(7):  # creation time
            yield from self._int()
        for _ in range(3):  # database name, server version, pg_dump version
            yield from self._str()

        count = yield from self._int()
        if count < 0:
            raise _Unusable(f"negative TOC entry count {count}")
        for _ in range(count):
            dump_id = yield from self._int()
            yield from self._int()  # had dumper
            yield from self._str()  # table OID
            yield from self._str()  # OID
            tag = yield from self._str(keep=True)
            desc = yield from self._str(keep=True)
            section = yield from self._int()
            for _ in range(2):  # defn, drop statement
                yield from self._str()
            copy_stmt = yield from self._bytes(_COPY_LIMIT if desc == "TABLE DATA" else 0)
            namespace = yield from self._str(keep=True)
            for _ in range(2):  # tablespace, table AM
                yield from self._str()
            if minor >= 16:
                yield from self._int()  # relkind
            yield from self._str()  # owner
            yield from self._str()  # with OIDs
            deps: list[int] = []
            while (dep := (yield from self._str(keep=True))) is not None:
                if dep.isdigit():
                    deps.append(int(dep))
            field_pos = self._pos
            raw = yield (_READ, 1 + self.off_size)
            assert raw is not None
            if raw[0] not in (K_OFFSET_POS_NOT_SET, K_OFFSET_POS_SET, K_OFFSET_NO_DATA):
                raise _Unusable(f"unexpected offset flag {raw[0]} for entry {dump_id}")
            if dump_id <= 0 or dump_id in self.entries:
                raise _Unusable(f"bad or repeated dump ID {dump_id}")
            self.entries[dump_id] = TocEntry(dump_id, desc or "", tag or "", field_pos, raw[0],
                                             int.from_bytes(raw[1:], "little"), namespace or "",
                                             section, tuple(deps), copy_stmt if copy_stmt and copy_stmt != b"..." else b"")

        self.toc_end = self._pos
        fast = self.compression == COMPRESSION_NONE
        while True:
            self._at_block_boundary = True
            block = yield (_READ, 2 + self.int_size)
            self._at_block_boundary = False
            assert block is not None
            start = self._pos - len(block)
            kind, dump_id = block[0], int.from_bytes(block[2:], "little")
            entry = self.entries.get(dump_id)
            if block[1] != 0 or entry is None or entry.flag == K_OFFSET_NO_DATA or dump_id in self.blocks:
                raise _Unusable(f"unexpected block header {block.hex()} at {start}")
            self.blocks[dump_id] = start
            self.block_at[start] = dump_id
            drop = self.drop_table_data and kind == BLK_DATA and entry.desc == "TABLE DATA"
            if drop:
                self.drop_from = start
            if kind == BLK_DATA:
                if fast:
                    yield (_SCAN, 1 + self.int_size)
                else:
                    yield from self._chunks()
                if drop:
                    self.dropped.append((start, self._pos))
                    self.drop_from = None
            elif kind == BLK_BLOBS:
                while (yield from self._int()) != 0:  # a large object's OID, then its chunks
                    yield from self._chunks()
            else:
                raise _Unusable(f"unknown block type {kind} at {start}")

    @property
    def settled(self) -> int:
        """Stream position through which every byte is known to be in a dropped block or not: all bytes fed,
        but those of a block header still incomplete."""
        if self._gen is not None and self._at_block_boundary:
            return self.size - len(self._buf)
        return self.size

    # --- results -----------------------------------------------------------------------
    def patches(self) -> list[Patch]:
        """Offsets to write once the whole archive was fed; empty (with ``problem`` set) if unusable.

        With dropped blocks: every dropped entry gets "no data", every other block its position in the
        archive without them."""
        if self.problem is None and not (self._at_block_boundary and not self._buf):
            self._stop(f"archive ends inside its {'data' if self.blocks else 'header or TOC'} at {self.size}")
        if self.problem is not None:
            return []
        out = []
        dropped = dict(self.dropped)  # start -> end
        removed = 0  # bytes dropped before the block at hand (blocks are in stream order)
        for dump_id, start in self.blocks.items():
            entry = self.entries[dump_id]
            if start in dropped:
                removed += dropped[start] - start
                out.append(Patch(dump_id, entry.field_pos, 0, K_OFFSET_NO_DATA))
            elif start - removed >= 1 << (8 * self.off_size):
                continue
            elif entry.flag == K_OFFSET_POS_NOT_SET or (self.dropped and entry.offset != start - removed):
                out.append(Patch(dump_id, entry.field_pos, start - removed))
        return out

    def written_size(self) -> int:
        return self.size - sum(end - start for start, end in self.dropped)


class ArchiveWriter:
    """Feeds an ``OffsetRecorder(drop_table_data=True)`` and writes what it does not drop to ``out``.

    A few bytes whose fate is not known yet (an incomplete block header) wait for the next ``feed``.
    If the recorder fails once blocks were dropped, the file cannot be completed: ``feed`` raises
    ``ValueError``; if it fails before, the rest of the archive is written whole."""

    def __init__(self, out: BinaryIO, recorder: OffsetRecorder,
                 on_dropped: Callable[[int, memoryview, bool], None] | None = None) -> None:
        self.out = out
        self.recorder = recorder
        self.on_dropped = on_dropped  # (block start, its next bytes, block ended): the dropped bytes, in order
        self._carry = b""  # fed bytes after the settled position
        self._done = 0  # stream position through which bytes were written or dropped
        self._next = 0  # index in recorder.dropped of the first range not wholly before _done

    def feed(self, chunk: bytes) -> None:
        rec = self.recorder
        rec.feed(chunk)
        if rec.problem is not None and (rec.dropped or rec.drop_from is not None):
            raise ValueError(f"cannot follow the archive's layout: {rec.problem}")
        settled = rec.settled if rec.problem is None else rec.size
        data = memoryview(self._carry + chunk if self._carry else chunk)
        upto = settled - self._done
        self._write_kept(data[:upto])
        self._carry = bytes(data[upto:])
        self._done = settled

    def _write_kept(self, view: memoryview) -> None:
        rec = self.recorder
        start, end = self._done, self._done + len(view)
        ranges = rec.dropped[self._next:]
        complete = len(ranges)
        if rec.drop_from is not None:
            ranges.append((rec.drop_from, end))
        pos = start
        for i, (a, b) in enumerate(ranges):
            if a >= end:
                break
            if a > pos:
                self.out.write(view[pos - start:a - start])
            if self.on_dropped is not None and b > pos:
                self.on_dropped(a, view[max(a, pos) - start:min(b, end) - start], i < complete and b <= end)
            pos = max(pos, b)
        if pos < end:
            self.out.write(view[pos - start:])
        while self._next < len(rec.dropped) and rec.dropped[self._next][1] <= end:
            self._next += 1

    def finish(self) -> None:
        """Write what is left (an archive that ends in an incomplete block header: ``patches`` says so)."""
        self._write_kept(memoryview(self._carry))
        self._done += len(self._carry)
        self._carry = b""


def patch_offsets(fd: int, recorder: OffsetRecorder) -> int:
    """Write the recorded data offsets into the archive open (read/write) on ``fd``; return how many.

    Each patch is checked against the file first (the flag byte still says "not set", the block at
    the offset has the entry's dump ID); any mismatch or error leaves the file as it is.  Never raises.
    """
    patches = recorder.patches()
    if not patches:
        log.debug("archive data offsets not patched: %s", recorder.problem or "no entry lacks its offset")
        return 0
    try:
        if os.fstat(fd).st_size != recorder.written_size():
            log.debug("archive data offsets not patched: file size %d, stream %d", os.fstat(fd).st_size, recorder.written_size())
            return 0
        for p in patches:
            block = os.pread(fd, 2 + recorder.int_size, p.offset)
            if (os.pread(fd, 1, p.field_pos) != bytes([recorder.entries[p.dump_id].flag])
                    or (p.flag == K_OFFSET_POS_SET and (len(block) < 2 + recorder.int_size or block[0] not in (BLK_DATA, BLK_BLOBS)
                                                        or block[1] != 0 or int.from_bytes(block[2:], "little") != p.dump_id))):
                log.debug("archive data offsets not patched: entry %d does not match the file", p.dump_id)
                return 0
        for p in patches:
            os.pwrite(fd, bytes([p.flag]) + p.offset.to_bytes(recorder.off_size, "little"), p.field_pos)
    except OSError as exc:
        log.debug("archive data offsets not patched: %s", exc)  # each written patch is valid on its own
        return 0
    log.debug("archive data offsets patched for %d of %d TOC entries", len(patches), len(recorder.entries))
    return len(patches)
