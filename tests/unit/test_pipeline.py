"""The streaming pipeline: every codec x cipher round trip, tamper and truncation detection, bounded memory."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from typing import Any

import blake3
import pytest

from saveit_backup.errors import DecryptionError, IntegrityError, RepositoryFormatError
from saveit_backup.pipeline.crypto import (
    FRAME_SIZE,
    Identity,
    Keyring,
    decrypt_frames,
    encrypt_buffer,
    encrypt_frames,
    generate_identity,
    parse_public_key,
)
from saveit_backup.pipeline.envelope import Digest, EncodeOptions, decode, decode_reader, describe, encode, encode_buffer
from saveit_backup.pipeline.threads import read_ahead


def chunks(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


PLAIN = os.urandom(300_000) + b"compressible " * 200_000


def keyrings(tmp_path: object) -> dict[str, tuple[Keyring | None, Keyring | None]]:
    text, public = generate_identity()
    path = os.path.join(str(tmp_path), "id")
    with open(path, "w") as f:
        f.write(text)
    return {
        "none": (None, None),
        "passphrase": (Keyring(passphrase="pw"), Keyring(passphrase="pw")),
        "recipient": (Keyring(recipients=[parse_public_key(public)]), Keyring(identities=[Identity.load(path)])),
    }


@pytest.mark.parametrize("codec", ["zstd", "lz4", "gzip", "none"])
@pytest.mark.parametrize("mode", ["none", "passphrase", "recipient"])
def test_round_trip(codec: str, mode: str, tmp_path: object) -> None:
    writer, reader = keyrings(tmp_path)[mode]
    digest = Digest()
    stored = b"".join(encode(chunks(PLAIN), EncodeOptions(codec=codec, encrypt=writer is not None), writer, digest))
    assert digest.plain_size == len(PLAIN) and digest.plain_digest == "blake3:" + blake3.blake3(PLAIN).hexdigest()
    assert digest.stored_size == len(stored)
    header = describe([stored])
    assert header["codec"] == codec and header["cipher"] == ("none" if writer is None else "aes-256-gcm")
    assert b"".join(decode(chunks(stored, 7777), reader)) == PLAIN


@pytest.mark.parametrize("codec", ["zstd", "lz4", "gzip", "none"])
@pytest.mark.parametrize("mode", ["none", "passphrase", "recipient"])
@pytest.mark.parametrize(("plain", "threads"), [(PLAIN, 0), (PLAIN, 2), (b"", 0), (b"x", 0)])
def test_encode_buffer_is_the_same_object_format(codec: str, mode: str, plain: bytes, threads: int, tmp_path: object) -> None:
    """One-call encoding (WAL segments): the streaming reader decodes it, digests as ``encode``'s."""
    writer, reader = keyrings(tmp_path)[mode]
    digest = Digest()
    stored = encode_buffer(memoryview(plain), EncodeOptions(codec=codec, threads=threads, encrypt=writer is not None), writer, digest)
    assert digest.plain_size == len(plain) and digest.plain_digest == "blake3:" + blake3.blake3(plain).hexdigest()
    cipher = "none" if writer is None else "aes-256-gcm"
    assert digest.stored_size == len(stored) and (digest.codec, digest.cipher) == (codec, cipher)
    assert describe([stored])["codec"] == codec and describe([stored])["cipher"] == cipher
    assert b"".join(decode(chunks(stored, 7777), reader)) == plain
    streamed = b"".join(encode(chunks(plain), EncodeOptions(codec=codec, encrypt=writer is not None), writer, Digest()))
    assert b"".join(decode([streamed], reader)) == b"".join(decode([stored], reader))
    if codec == "zstd" and writer is None and plain:  # one frame that records its size (the streamed one cannot)
        import zstandard

        body = stored[len(stored) - len(stored.split(b"}", 1)[1]):]
        assert zstandard.get_frame_parameters(body).content_size == len(plain)
    known = Digest()
    sealed = encode_buffer(plain, EncodeOptions(codec=codec, encrypt=writer is not None, hash=False), writer, known,
                           plain_digest="blake3:" + "ab" * 32)
    assert known.plain_digest == describe([sealed])["digest"] == "blake3:" + "ab" * 32  # comparable without the key


def _read_all(reader: Any, size: int = 100_003) -> bytes:
    """Everything ``reader.readinto`` gives, in pieces of ``size``."""
    out, buf = bytearray(), bytearray(size)
    with memoryview(buf) as view:
        while n := reader.readinto(view):
            out += view[:n]
    return bytes(out)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "gzip", "none"])
@pytest.mark.parametrize("mode", ["none", "passphrase"])
@pytest.mark.parametrize("threads", [0, 2])  # zstd: frames with an end marker, or one frame of worker threads
@pytest.mark.parametrize("plain", [PLAIN, b"", os.urandom(5 << 20)])
def test_decode_reader_gives_decode_s_bytes(codec: str, mode: str, threads: int, plain: bytes, tmp_path: object) -> None:
    writer, reader = keyrings(tmp_path)[mode]
    stored = b"".join(encode(chunks(plain), EncodeOptions(codec=codec, threads=threads, encrypt=writer is not None), writer, Digest()))
    with decode_reader(chunks(stored, 7777), reader) as plain_file:
        assert _read_all(plain_file) == plain


def test_decode_reader_errors_and_closing() -> None:
    from saveit_backup.storage.memory import MemoryStorage
    from saveit_backup.storage.wrappers import LimitedStorage

    stored = b"".join(encode(chunks(PLAIN), EncodeOptions(codec="zstd"), None, Digest()))
    body_at = 8 + int.from_bytes(stored[4:8], "big")  # magic and version, header length, header
    with decode_reader([stored[: len(stored) - 5000]], None) as cut:  # a cut stream ends early: the caller checks the size
        got = _read_all(cut)
        assert len(got) < len(PLAIN) and PLAIN.startswith(got)
    corrupt = bytearray(stored)
    corrupt[body_at + 4] ^= 0xFF  # the first frame's header
    with pytest.raises(IntegrityError, match="corrupt zstd"), decode_reader([bytes(corrupt)], None) as bad:
        _read_all(bad)
    storage = LimitedStorage(MemoryStorage(), 1)  # one permit: a reader that does not release it blocks the next open
    storage.put("o", stored)
    for codec in ("zstd", "lz4", "zstd"):
        storage.put(codec, b"".join(encode(chunks(PLAIN), EncodeOptions(codec=codec), None, Digest())))
        with decode_reader(storage.open(codec), None) as part:
            part.readinto(bytearray(10))  # left unfinished
        with decode_reader(storage.open(codec), None):
            pass  # never read
    storage.put("e", b"".join(encode(chunks(PLAIN), EncodeOptions(encrypt=True), Keyring(passphrase="k"), Digest())))
    with pytest.raises(DecryptionError):  # a wrong key fails at once, and releases the permit
        decode_reader(storage.open("e"), Keyring(passphrase="wrong"))
    with decode_reader(storage.open("o"), None) as whole:
        assert _read_all(whole) == PLAIN


@pytest.mark.parametrize("size", [0, 1, FRAME_SIZE - 1, FRAME_SIZE, FRAME_SIZE + 1, 3 * FRAME_SIZE])
def test_frames_detect_truncation_at_any_boundary(size: int) -> None:
    key, plain = os.urandom(32), os.urandom(size)
    sealed = b"".join(encrypt_frames([plain], key, b"hdr"))
    assert b"".join(encrypt_buffer(memoryview(plain), key, b"hdr")) == sealed  # the in-memory path seals the same frames
    assert b"".join(decrypt_frames(iter([sealed]), key, b"hdr", "x")) == plain
    for cut in {1, 16, FRAME_SIZE + 16}:
        if cut < len(sealed):
            with pytest.raises(IntegrityError):
                b"".join(decrypt_frames(iter([sealed[:-cut]]), key, b"hdr", "x"))
    with pytest.raises(IntegrityError):  # a header swapped for another one
        b"".join(decrypt_frames(iter([sealed]), key, b"other", "x"))


def test_flipped_byte_and_wrong_key() -> None:
    kr = Keyring(passphrase="right")
    stored = bytearray(b"".join(encode(chunks(PLAIN), EncodeOptions(encrypt=True), kr, Digest())))
    with pytest.raises(DecryptionError, match="does not open"):
        b"".join(decode([bytes(stored)], Keyring(passphrase="wrong")))
    with pytest.raises(DecryptionError, match="no matching key"):
        b"".join(decode([bytes(stored)], None))
    stored[len(stored) // 2] ^= 1
    with pytest.raises(IntegrityError, match="fails authentication"):
        b"".join(decode([bytes(stored)], kr))


def test_unknown_envelope_version_refused() -> None:
    stored = bytearray(b"".join(encode([b"x"], EncodeOptions(), None, Digest())))
    stored[3] = 9
    with pytest.raises(RepositoryFormatError, match="version 9"):
        b"".join(decode([bytes(stored)], None))
    with pytest.raises(IntegrityError, match="bad magic"):
        b"".join(decode([b"NOPE" + bytes(stored[4:])], None))


def _peak_through_pipeline(mib: int) -> int:
    block = os.urandom(1 << 20)

    def source() -> Iterator[bytes]:
        for _ in range(mib):
            yield block

    kr = Keyring(passphrase="pw")
    tracemalloc.start()
    total = 0
    for chunk in decode(encode(source(), EncodeOptions(codec="zstd", threads=2, encrypt=True), kr, Digest()), kr):
        total += len(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == mib << 20
    return peak


def test_memory_bounded_for_large_streams() -> None:
    """compress+encrypt+decode holds a few zstd jobs, not the stream: 4x the data, not more memory."""
    small, large = _peak_through_pipeline(64), _peak_through_pipeline(256)
    assert large < 48 << 20, f"peak {large / 2**20:.1f} MiB"
    assert large < small * 1.5 + (4 << 20), (small, large)


def test_failed_decodes_release_storage_permits() -> None:
    """A wrong key or a corrupt frame must not leak the stream's concurrency permit (it used to hang restores)."""
    from saveit_backup.storage.memory import MemoryStorage
    from saveit_backup.storage.wrappers import LimitedStorage

    storage = LimitedStorage(MemoryStorage(), 1)
    kr = Keyring(passphrase="right")
    stored = bytearray(b"".join(encode(chunks(PLAIN), EncodeOptions(encrypt=True), kr, Digest())))
    storage.put("good", bytes(stored))
    stored[len(stored) // 2] ^= 1
    storage.put("bad", bytes(stored))
    errors: list[BaseException] = []
    for _ in range(3):  # one permit: a leak blocks the second open forever
        try:
            b"".join(decode(storage.open("good"), Keyring(passphrase="wrong")))
        except DecryptionError as exc:
            errors.append(exc)  # keeps the traceback (and its frames) alive, as a Future does
        try:
            b"".join(decode(storage.open("bad"), kr))
        except IntegrityError as exc:
            errors.append(exc)
    assert len(errors) == 6
    assert b"".join(decode(storage.open("good"), kr)) == PLAIN


def test_read_ahead_keeps_order_passes_errors_and_stops_when_abandoned() -> None:
    """Pure: the helper thread's items arrive in order; its error reaches the consumer; a consumer that stops
    early ends the thread and closes the source (which releases a storage permit)."""
    import threading

    assert list(read_ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("boom")

    got: list[int] = []
    with pytest.raises(ValueError, match="boom"):
        for item in read_ahead(failing()):
            got.append(item)
    assert got == [1]

    closed: list[bool] = []

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.append(True)

    before = threading.active_count()
    stream = read_ahead(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()  # type: ignore[attr-defined]
    assert closed == [True] and threading.active_count() == before


FRAMED = [0, 1, 4 << 20, (4 << 20) + 1, (9 << 20) + 7]


@pytest.mark.parametrize("size", FRAMED)
@pytest.mark.parametrize("chunk", [4 << 20, 7777, 5 << 20])
def test_single_threaded_zstd_writes_frames_and_an_end_marker(size: int, chunk: int) -> None:
    """threads=0 zstd: 4 MiB frames compressed in one call each, then an end marker that counts the plain
    bytes; a body cut anywhere, even between frames, or extended, is refused; standard zstd reads it."""
    import shutil
    import struct
    import subprocess

    import zstandard

    from saveit_backup.pipeline.compress import DECODE_SLICE, ZSTD_FRAME_INPUT, compress_stream, decompress_stream

    plain = (PLAIN * (size // len(PLAIN) + 1))[:size]
    body = b"".join(compress_stream(chunks(plain, chunk), "zstd", 3, threads=0))
    assert b"".join(decompress_stream(chunks(body, 3333), "zstd", zstd_framed=True)) == plain
    frames = [zstandard.ZstdCompressor(level=3).compress(plain[i : i + ZSTD_FRAME_INPUT]) for i in range(0, size, ZSTD_FRAME_INPUT)]
    assert body == b"".join(frames) + struct.pack("<IIQ", 0x184D2A5E, 8, size)  # the frames, then the end marker
    boundaries = [sum(len(f) for f in frames[:k]) for k in range(len(frames) + 1)]
    assert b"".join(decompress_stream(chunks(body, DECODE_SLICE), "zstd", zstd_framed=True)) == plain
    for split in (len(body) - 8, len(body) - 15, *[b + 2 for b in boundaries if b + 2 < len(body)]):  # marker or frame split
        assert b"".join(decompress_stream([body[:split], body[split:]], "zstd", zstd_framed=True)) == plain
    if len(frames) > 1:  # a frame dropped, the marker kept: the count differs
        with pytest.raises(IntegrityError, match="end marker says"):
            b"".join(decompress_stream([b"".join(frames[1:]) + body[-16:]], "zstd", zstd_framed=True))
    if size:
        with pytest.raises(IntegrityError):  # a one-frame reader refuses a framed body
            b"".join(decompress_stream([body], "zstd"))
    for cut in {0, 1, len(body) - 1, len(body) - 16, len(body) - 17, *[b for b in boundaries if 0 < b < len(body)]}:
        with pytest.raises(IntegrityError):
            b"".join(decompress_stream([body[:cut]], "zstd", zstd_framed=True))
    with pytest.raises(IntegrityError):
        b"".join(decompress_stream([body + b"\0"], "zstd", zstd_framed=True))
    if shutil.which("zstd"):  # the disaster path of docs/format.md: a standard decoder skips the marker
        assert subprocess.run(["zstd", "-dc"], input=body, capture_output=True, check=True).stdout == plain


def test_zstd_frame_header_only_where_frames_are_written() -> None:
    """The header names the framing; one-frame objects (zstd threads, buffers up to one frame's input) and
    objects written before framing existed decode as one frame."""
    from saveit_backup.pipeline.compress import compress_stream

    big = PLAIN * 4  # several frames
    writer, reader = Keyring(passphrase="pw"), Keyring(passphrase="pw")
    framed = b"".join(encode(chunks(big), EncodeOptions(threads=0), None, Digest()))
    sealed = b"".join(encode(chunks(big, 1 << 20), EncodeOptions(threads=0, encrypt=True), writer, Digest()))
    threaded = b"".join(encode(chunks(big), EncodeOptions(threads=2), None, Digest()))
    small = encode_buffer(PLAIN, EncodeOptions(threads=2), None, Digest())  # up to one frame's input: one frame
    assert describe([framed])["zstd_frame"] == describe([sealed])["zstd_frame"] == 4 << 20
    assert framed[3] == sealed[3] == 2 and threaded[3] == small[3] == 1  # envelope version: older readers refuse 2
    assert "zstd_frame" not in describe([threaded]) and "zstd_frame" not in describe([small])
    for threads in (0, 1, 2, 5):  # buffers over one frame: the streamed frames, whichever thread compressed each
        assert encode_buffer(memoryview(big), EncodeOptions(threads=threads), None, Digest()) == framed
    for stored in (framed, threaded, small):
        assert b"".join(decode(chunks(stored, 9999), None)) == (PLAIN if stored is small else big)
    assert b"".join(decode(chunks(sealed, 9999), reader)) == big
    old = b"SVB\x01" + len(b'{"cipher":"none","codec":"zstd"}').to_bytes(4, "big") + b'{"cipher":"none","codec":"zstd"}'
    old += b"".join(compress_stream(chunks(PLAIN), "zstd", 3, threads=1))  # one streaming frame, as version 1 wrote
    assert b"".join(decode([old], None)) == PLAIN


def test_buffer_frames_compressed_in_threads_hand_errors_to_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that fails in a helper thread fails the call, after every helper has let go of the input."""
    from saveit_backup.pipeline import compress

    real = compress._zstd_compressor
    calls: list[int] = []

    class Failing:
        def __init__(self) -> None:
            self.inner = real(1, 0)

        def compress(self, data: memoryview) -> bytes:
            calls.append(len(data))
            if len(calls) == 2:
                raise MemoryError("no room for this frame")
            return self.inner.compress(data)

    monkeypatch.setattr(compress, "_zstd_compressor", lambda level, threads: Failing())
    data = bytearray(PLAIN * 6)  # five frames
    with pytest.raises(MemoryError, match="no room"):
        compress.compress_buffer(data, "zstd", 1, threads=3)
    data += b"resizable again: no view of it is left"
