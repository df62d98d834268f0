"""Self-describing stored objects and the pipelines that make and read them.

Layout (docs/format.md, "Object envelope"):

    b"SVB" + version byte (1) | header length, uint32 big-endian | header JSON | body

The header names the codec and cipher (and the wrapped data keys); the body is
the compressed stream, sealed in AES-256-GCM frames when encrypted.  ``encode``
hashes and sizes the *plain* bytes as they pass (observers never change bytes);
``decode`` builds the inverse pipeline from the header alone.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from saveit_backup.errors import EncryptionConfigError, IntegrityError, RepositoryFormatError
from saveit_backup.pipeline import digests
from saveit_backup.pipeline.compress import (
    buffer_frame_input,
    check_codec,
    compress_buffer,
    compress_stream,
    decompress_reader,
    decompress_stream,
    zstd_frame_input,
)
from saveit_backup.pipeline.crypto import FRAME_SIZE, Keyring, decrypt_frames, encrypt_buffer, encrypt_frames

MAGIC = b"SVB"
ENVELOPE_VERSION = 1
# Version 2: the same layout; written for bodies of several zstd frames (header ``zstd_frame``), so
# that builds which read only one frame refuse them instead of returning the first frame's bytes.
ENVELOPE_VERSIONS = (1, 2)
_PREFIX = struct.Struct(">3sBI")
MAX_HEADER = 1 << 20


class EncodeOptions(NamedTuple):
    codec: str = "zstd"
    level: int | None = None
    threads: int = 0
    encrypt: bool = False
    hash: bool = True  # False: skip the digest observer (callers that know or do not need the digest)


class Digest:
    """Filled while the stream passes; read after the stream is exhausted."""

    __slots__ = ("cipher", "codec", "plain_digest", "plain_size", "stored_size")

    def __init__(self) -> None:
        self.plain_size = 0
        self.plain_digest = ""  # "<algorithm>:<hex>" (pipeline.digests)
        self.stored_size = 0
        self.codec = ""
        self.cipher = ""


def _observe(chunks: Iterable[bytes], digest: Digest, hashing: bool) -> Iterator[bytes]:
    h = digests.new() if hashing else None  # wal-push does not hash: nothing loads
    size = 0
    for chunk in chunks:
        if h is not None:
            h.update(chunk)
        size += len(chunk)
        yield chunk
    digest.plain_size = size
    digest.plain_digest = digests.tagged(h) if h is not None else digest.plain_digest


def _count(chunks: Iterable[bytes], digest: Digest) -> Iterator[bytes]:
    for chunk in chunks:
        digest.stored_size += len(chunk)
        yield chunk


def _start(options: EncodeOptions, keyring: Keyring | None, digest: Digest, plain_digest: str | None,
           zstd_frame: int = 0) -> tuple[bytes, bytes, bytes]:
    """(envelope prefix and header, header (the cipher's associated data), data key or b"") for a new
    object; records codec and cipher in ``digest``."""
    header: dict[str, Any] = {"codec": check_codec(options.codec), "cipher": "none"}
    if zstd_frame:
        header["zstd_frame"] = zstd_frame
    if plain_digest:
        header[digests.FIELD] = plain_digest
        digest.plain_digest = plain_digest
    data_key = b""
    if options.encrypt:
        if keyring is None or not keyring.can_write_encrypted:
            raise EncryptionConfigError("the repository requires encryption but no passphrase or recipient is configured")
        data_key = os.urandom(32)
        header.update(cipher="aes-256-gcm", frame=FRAME_SIZE, slots=keyring.wrap(data_key))
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    digest.codec, digest.cipher = header["codec"], header["cipher"]
    head = _PREFIX.pack(MAGIC, 2 if zstd_frame else ENVELOPE_VERSION, len(header_bytes)) + header_bytes
    return head, header_bytes, data_key


def encode(chunks: Iterable[bytes], options: EncodeOptions, keyring: Keyring | None, digest: Digest,
           plain_digest: str | None = None) -> Iterator[bytes]:
    """plain chunks -> (hash, size) -> compress -> encrypt -> envelope bytes.

    ``plain_digest``, when the caller knows it up front, is written into the
    header (authenticated with the body) so the object can be compared without
    decrypting it, e.g. by a host that holds only public keys.
    """
    head, header_bytes, data_key = _start(options, keyring, digest, plain_digest, zstd_frame_input(options.codec, options.threads))

    def body() -> Iterator[bytes]:
        yield head
        stream = compress_stream(_observe(chunks, digest, options.hash and not plain_digest), options.codec, options.level,
                                 options.threads)
        if options.encrypt:
            stream = encrypt_frames(stream, data_key, header_bytes)
        yield from stream

    return _count(body(), digest)


def encode_buffer(data: bytes | bytearray | memoryview, options: EncodeOptions, keyring: Keyring | None, digest: Digest,
                  plain_digest: str | None = None) -> bytes:
    """``encode`` of bytes already in memory, compressed in one call per frame (``compress_buffer``); the same object format."""
    head, header_bytes, data_key = _start(options, keyring, digest, plain_digest, buffer_frame_input(options.codec, len(data)))
    if options.hash and not plain_digest:
        digest.plain_digest = digests.of_bytes(data)
    digest.plain_size = len(data)
    body = compress_buffer(data, options.codec, options.level, options.threads)
    if options.encrypt:  # sealed from one buffer: streaming frames through a bytearray costs page faults and copies
        body = encrypt_buffer(body[0] if len(body) == 1 else b"".join(body), data_key, header_bytes)
    out = b"".join([head, *body])
    digest.stored_size = len(out)
    return out


class _Reader:
    """Pull exact byte counts out of a chunk iterator."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def take(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def rest(self) -> Iterator[bytes]:
        if self._buf:
            yield self._buf
            self._buf = b""
        yield from self._it


def read_header(reader: _Reader, what: str) -> tuple[dict[str, Any], bytes]:
    prefix = reader.take(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise IntegrityError(f"{what}: object is truncated (no header)")
    magic, version, length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise IntegrityError(f"{what}: not a saveit-backup object (bad magic)")
    if version not in ENVELOPE_VERSIONS:
        raise RepositoryFormatError(f"{what}: object envelope version {version} is not supported (this build reads "
                                    f"{', '.join(map(str, ENVELOPE_VERSIONS))})")
    if length > MAX_HEADER:
        raise IntegrityError(f"{what}: object header length {length} is implausible")
    header_bytes = reader.take(length)
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise IntegrityError(f"{what}: object header is not valid JSON") from exc
    return header, header_bytes


def decode(chunks: Iterable[bytes], keyring: Keyring | None, what: str = "object") -> Iterator[bytes]:
    """Inverse of ``encode``, built from the object's own header.

    The header is read (and the key unwrapped) now, so a wrong key fails here.  Whenever decoding
    ends, by exhaustion or by an error, the source is closed: a storage stream may hold a
    concurrency permit, and an exception's traceback would otherwise keep it alive.
    """
    try:
        header, body = _open_body(chunks, keyring, what)
        plain = decompress_stream(body, str(header.get("codec")), bool(header.get("zstd_frame")))
    except BaseException:
        _close(chunks)
        raise
    return _closing(plain, chunks)


def decode_reader(chunks: Iterable[bytes], keyring: Keyring | None, what: str = "object") -> io.RawIOBase:
    """``decode`` as a raw file object whose ``readinto`` decompresses zstd straight into the caller's
    buffer.  It does not check the plain size (a cut stream ends early): the caller compares it with
    the size it expects.  Closing it closes ``chunks``."""
    try:
        header, body = _open_body(chunks, keyring, what)
        return decompress_reader(body, str(header.get("codec")), bool(header.get("zstd_frame")), source=chunks)
    except BaseException:
        _close(chunks)
        raise


def _open_body(chunks: Iterable[bytes], keyring: Keyring | None, what: str) -> tuple[dict[str, Any], Iterator[bytes]]:
    """The header and the body, decrypted (still compressed)."""
    reader = _Reader(chunks)
    header, header_bytes = read_header(reader, what)
    cipher = header.get("cipher")
    body = reader.rest()
    if cipher == "aes-256-gcm":
        key = (keyring or Keyring()).unwrap(header.get("slots", []), what)
        body = decrypt_frames(body, key, header_bytes, what, int(header.get("frame", FRAME_SIZE)))
    elif cipher != "none":
        raise RepositoryFormatError(f"{what}: unsupported cipher {cipher!r}")
    return header, body


def _close(source: Iterable[bytes]) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _closing(stream: Iterator[bytes], source: Iterable[bytes]) -> Iterator[bytes]:
    try:
        yield from stream
    finally:
        _close(source)


def describe(chunks: Iterable[bytes], what: str = "object") -> dict[str, Any]:
    """The header of an object (for show/verify), without reading the body."""
    return read_header(_Reader(chunks), what)[0]
