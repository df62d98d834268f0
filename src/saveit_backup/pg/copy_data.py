"""COPY text out of the TABLE DATA blocks of an uncompressed custom-format archive, without pg_restore.

A data block (``pg/custom_archive.py`` describes the layout) is a sequence of chunks, each an int length
(a zero sign byte, then ``int_size`` bytes, least significant first) and that many bytes, ending with a
zero length; the bytes, put together, are the table's COPY text.  ``pg_dump -Z0`` writes one chunk per
row, so a big table has millions of chunk headers, too many to read one at a time in Python (0.4 us
each).  ``whole_chunks`` finds them in bulk with numpy: every COPY row ends with a newline, so a chunk
header sits at the buffer's start or right after a newline byte; the candidates are kept only if they
form one unbroken chain (each header's length leads exactly to the next one), which is the walk
``walk_chunks`` does one header at a time.  The payload is then cut out with two C loops: the length
bytes are zeroed, so every header is a run of ``1 + int_size`` NUL bytes, and ``bytes.replace`` removes
those runs (COPY text never holds a NUL byte; a payload of the wrong length says it did, and the chunks
are walked instead).  Chunks that do not end at newlines (INSERT statements, or a pg_dump that writes
bigger chunks) are walked one at a time, which is fast exactly then: there are few of them.

``DataBlock`` takes one block's bytes in pieces of any size and returns the payload in pieces of about
``PIECE_BYTES``; memory stays at about two pieces (or the longest chunk).
"""

from __future__ import annotations

import numpy as np

from saveit_backup.errors import IntegrityError

PIECE_BYTES = 1 << 20


Payload = bytes | bytearray


def whole_chunks(buf: bytes | bytearray, int_size: int) -> tuple[Payload, int, bool] | None:
    """(payload of the whole chunks at the start of ``buf``, bytes of ``buf`` they used, end marker reached);
    ``buf`` starts at a chunk header.  None if the headers are not one after each newline (walk them)."""
    hdr = 1 + int_size
    n = len(buf)
    arr = np.frombuffer(buf, np.uint8)
    newlines = np.flatnonzero(arr == 10)
    cand = np.empty(len(newlines) + 1, np.int64)
    cand[0] = 0
    np.add(newlines, 1, out=cand[1:])
    cand = cand[:int(np.searchsorted(cand, n - hdr, "right"))]  # candidates with their whole header in buf
    if not len(cand):
        return b"", 0, False
    bad = arr[cand] != 0  # the sign byte
    length = np.zeros(len(cand), np.int64)
    for k in range(int_size):
        byte = arr[cand + 1 + k]
        if k < 4:
            length |= byte.astype(np.int64) << (8 * k)
        else:
            bad |= byte != 0  # a chunk of 4 GiB or more is no row
    nxt = cand + hdr + length
    stop = bad | (length == 0)

    def first_break(cand: np.ndarray, nxt: np.ndarray, stop: np.ndarray) -> int:
        brk = np.flatnonzero((nxt[:-1] != cand[1:]) | stop[:-1])
        return int(brk[0]) if len(brk) else len(cand) - 1

    m = first_break(cand, nxt, stop)
    if not stop[m] and m < len(cand) - 1:
        # A newline inside a header (a length byte of 10) made a false candidate: keep the buffer's start and
        # the candidates some length leads to, and chain again.
        targets = nxt[~stop]
        targets = targets[targets <= cand[-1]]
        idx = np.searchsorted(cand, targets)
        keep = np.zeros(len(cand), bool)
        keep[0] = True
        keep[idx[cand[idx] == targets]] = True
        cand, nxt, stop, bad, length = cand[keep], nxt[keep], stop[keep], bad[keep], length[keep]
        m = first_break(cand, nxt, stop)
        if not stop[m] and m < len(cand) - 1:
            return None
    if bad[m]:
        return None
    if length[m] == 0:  # the end marker
        heads, end, used, ended = cand[:m], int(cand[m]), int(cand[m]) + hdr, True
    else:
        e = int(nxt[m])
        if e <= n - hdr:  # the next header is in buf but follows no newline: chunks that are not rows
            return None
        if e <= n:
            heads, end = cand[:m + 1], e
        else:
            heads, end = cand[:m], int(cand[m])
        used, ended = end, False
    work = bytearray(memoryview(buf)[:end])
    view = np.frombuffer(work, np.uint8)
    for k in range(1, hdr):
        view[heads + k] = 0
    payload = work.replace(b"\0" * hdr, b"")
    if len(payload) != end - hdr * len(heads):
        return None  # NUL bytes in the data: not COPY text, walk it
    return payload, used, ended


def walk_chunks(buf: bytes | bytearray, int_size: int) -> tuple[Payload, int, bool]:
    """``whole_chunks`` one header at a time: for any chunk sizes."""
    hdr = 1 + int_size
    view = memoryview(buf)
    pieces: list[memoryview] = []
    pos = 0
    while pos + hdr <= len(buf):
        if buf[pos] != 0:
            raise IntegrityError(f"negative chunk length in a table's data at byte {pos} of a block",
                                 hint="the archive is damaged; verify the backup")
        size = int.from_bytes(view[pos + 1:pos + hdr], "little")
        if size == 0:
            return b"".join(pieces), pos + hdr, True
        if pos + hdr + size > len(buf):
            break
        pieces.append(view[pos + hdr:pos + hdr + size])
        pos += hdr + size
    return b"".join(pieces), pos, False


class DataBlock:
    """One TABLE DATA block, fed from its first byte (the block header); ``feed`` and ``finish`` return the
    payload so far, in pieces.  ``finish`` raises if the block did not end with its end marker."""

    def __init__(self, int_size: int) -> None:
        self.int_size = int_size
        self.skip = 2 + int_size  # block type, dump ID
        self.buf = bytearray()
        self.ended = False
        self.walked = False  # the bulk path did not apply

    def feed(self, data: bytes | memoryview) -> list[Payload]:
        if self.skip:
            cut = min(self.skip, len(data))
            data, self.skip = data[cut:], self.skip - cut
        if self.ended:
            if len(data):
                raise IntegrityError("bytes after the end of a table's data block", hint="the archive is damaged; verify the backup")
            return []
        self.buf += data
        return self._take(PIECE_BYTES)

    def finish(self) -> list[Payload]:
        out = self._take(1)
        if not self.ended or self.buf:
            raise IntegrityError("a table's data block ends early or runs on", hint="the archive is damaged; verify the backup")
        return out

    def _take(self, least: int) -> list[Payload]:
        out: list[Payload] = []
        while not self.ended and len(self.buf) >= least:
            window = self.buf[:PIECE_BYTES] if len(self.buf) > 2 * PIECE_BYTES else self.buf  # a copy, or buf itself
            found = None if self.walked else whole_chunks(window, self.int_size)
            if found is None:
                self.walked = True
                found = walk_chunks(self.buf, self.int_size)
            elif found[1] == 0 and len(window) < len(self.buf):
                found = walk_chunks(self.buf, self.int_size)  # a chunk longer than the window
            payload, used, self.ended = found
            if used == 0:
                break  # the first chunk is longer than what is here: wait for more
            del self.buf[:used]
            if payload:
                out.append(payload)
        return out
