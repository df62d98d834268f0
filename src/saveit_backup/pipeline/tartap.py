"""An observer on a tar stream: keeps one member's content as the bytes pass, never changes them.

Used for the ``backup_manifest`` that pg_basebackup appends to the tar it writes to stdout: the
manifest is stored as an object of its own so that a later ``pg_basebackup --incremental`` can be
given it without reading the whole archive back.  Understands ustar/GNU headers (octal or base-256
sizes); extension headers (pax ``x``/``g``, GNU ``L``/``K``) are skipped like members, so a member
named only through them is not matched (pg_basebackup writes plain ustar headers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from saveit_backup.errors import IntegrityError

BLOCK = 512


def _size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace")
        if prefix:
            name = f"{prefix}/{name}"
    return name.removeprefix("./")


class TarMemberTap:
    """``observe(chunks)`` yields the chunks unchanged; afterwards ``content`` holds member ``name`` (None: absent)."""

    def __init__(self, name: str, limit: int = 1 << 30) -> None:
        self.name = name
        self.limit = limit
        self.content: bytes | None = None
        self._header = bytearray()
        self._skip = 0  # bytes of the current member (and its padding) still to pass
        self._keep = 0  # of those, bytes still to keep
        self._kept = bytearray()
        self._ended = False

    def observe(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if not self._ended:
                self._feed(memoryview(chunk))
            yield chunk

    def _feed(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data) and not self._ended:
            if self._skip:
                n = min(self._skip, len(data) - pos)
                if self._keep:
                    k = min(self._keep, n)
                    self._kept += data[pos : pos + k]
                    self._keep -= k
                    if not self._keep:
                        self.content = bytes(self._kept)
                        self._kept = bytearray()
                self._skip -= n
                pos += n
                continue
            n = min(BLOCK - len(self._header), len(data) - pos)
            self._header += data[pos : pos + n]
            pos += n
            if len(self._header) == BLOCK:
                self._start_member(bytes(self._header))
                self._header = bytearray()

    def _start_member(self, header: bytes) -> None:
        if not any(header):
            self._ended = True  # end-of-archive blocks
            return
        size = _size(header[124:136])
        self._skip = (size + BLOCK - 1) // BLOCK * BLOCK
        if header[156:157] in (b"0", b"\0") and _name(header) == self.name:
            if size > self.limit:
                raise IntegrityError(f"tar member {self.name} is {size} bytes, more than the {self.limit} expected")
            self._keep = size
            if size == 0:
                self.content = b""
