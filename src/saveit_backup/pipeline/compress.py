"""Streaming compression codecs: zstd (default), lz4, gzip, none.

A codec is named in every object header; readers pick the decompressor from
that name, never from today's configuration.  All codecs release the GIL.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from saveit_backup.errors import ConfigError, IntegrityError


def _zstandard_backend() -> ModuleType:
    """python-zstandard's C backend, loaded without the package's ``__init__``, which imports ``platform`` and
    ``typing`` (about 4 ms of every ``archive_command`` here; the backend alone takes 0.1 ms).  The package,
    if imported later, takes this module from ``sys.modules``: the same classes.  Any other layout (the
    cffi backend, an import policy set): the package itself."""
    import sys

    if "zstandard" not in sys.modules and not os.environ.get("PYTHON_ZSTANDARD_IMPORT_POLICY"):
        from importlib.machinery import ExtensionFileLoader, PathFinder

        package = PathFinder.find_spec("zstandard")
        locations = package.submodule_search_locations if package else None
        spec = PathFinder.find_spec("zstandard.backend_c", locations) if locations else None
        if spec is not None and isinstance(spec.loader, ExtensionFileLoader):
            module = spec.loader.create_module(spec)
            if module is not None:
                module.__spec__, module.__loader__ = spec, spec.loader
                spec.loader.exec_module(module)
                if hasattr(module, "ZstdCompressor"):
                    sys.modules[spec.name] = module
                    return module
    import zstandard as package_module

    return package_module


if TYPE_CHECKING:
    import zstandard
else:
    zstandard = _zstandard_backend()

CODECS = ("zstd", "lz4", "gzip", "none")
# zstd 1 with worker threads: same size as level 3 on database dumps measured here (bench/logical.py),
# 40% less CPU and half the memory; levels >= 6 double the CPU for no gain.
DEFAULT_LEVELS = {"zstd": 1, "lz4": 0, "gzip": 6, "none": 0}
OUT_PIECE = 1 << 20
# zstd worker threads each take jobs of this much input.  zstd's default grows with the level (8 MiB
# at level 3) and every worker holds input and output buffers of a job: 2 MiB jobs halved a
# compressor's memory on relation files with the same output size and speed (measured here).
ZSTD_JOB_SIZE = 2 << 20
DECODE_SLICE = 16 << 10  # feed decompressors in slices: one call's output stays small (bounded memory)
DECODE_READ = 128 << 10  # what a decompressing reader takes from its source at a time
# Single-threaded zstd (the backup's parallel workers, one codec each) writes frames of this much plain
# input, each compressed in one call, then an end marker (docs/format.md, "zstd_frame"): 25-30% less CPU
# than one streaming frame on relation files and WAL, no larger (measured here; a streaming frame matches
# through its wrapping window buffer, zstd's slower path).
ZSTD_FRAME_INPUT = 4 << 20
_END_MAGIC = 0x184D2A5E  # a zstd skippable frame (RFC 8878 section 3.1.2): standard decoders skip it
_END = struct.Struct("<IIQ")  # magic, payload length (8), plain size of all frames


class _Stream(Protocol):
    def compress(self, data: bytes) -> bytes: ...


def check_codec(name: str) -> str:
    if name not in CODECS:
        raise ConfigError(f"unknown compression {name!r}", hint=f"choose one of {', '.join(CODECS)}")
    return name


def _zstd_compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """A zstandard compressor; ``threads`` > 0 adds worker threads taking ``ZSTD_JOB_SIZE`` jobs."""
    if threads > 0:
        params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, job_size=ZSTD_JOB_SIZE)
        return zstandard.ZstdCompressor(compression_params=params)
    return zstandard.ZstdCompressor(level=level)


def zstd_frame_input(codec: str, threads: int) -> int:
    """Plain bytes per zstd frame that ``compress_stream`` writes with these settings; 0: one frame."""
    return ZSTD_FRAME_INPUT if codec == "zstd" and threads <= 0 else 0


def compress_stream(chunks: Iterable[bytes], codec: str, level: int | None = None, threads: int = 0) -> Iterator[bytes]:
    """Compress ``chunks``; ``threads`` > 0 lets zstd use worker threads (one frame), else see ``zstd_frame_input``."""
    lvl = DEFAULT_LEVELS[check_codec(codec)] if level is None else level
    if codec == "none":
        yield from chunks
        return
    if zstd_frame_input(codec, threads):
        yield from _zstd_frames(chunks, lvl)
        return
    comp: _Stream
    flush: Callable[[], bytes]
    if codec == "zstd":
        zc = _zstd_compressor(lvl, threads).compressobj(size=-1)
        comp, flush = zc, zc.flush
    elif codec == "lz4":
        import lz4.frame

        lz = lz4.frame.LZ4FrameCompressor(compression_level=lvl)
        first = lz.begin()
        if first:
            yield first
        for chunk in chunks:
            out = lz.compress(chunk)
            if out:
                yield out
        yield lz.flush()
        return
    else:
        gz = zlib.compressobj(lvl, zlib.DEFLATED, 31)  # 31: real gzip framing
        comp, flush = gz, gz.flush
    for chunk in chunks:
        out = comp.compress(chunk)
        if out:
            yield from _pieces(out)
    yield from _pieces(flush())


def _zstd_frames(chunks: Iterable[bytes], level: int) -> Iterator[bytes]:
    """Frames of ``ZSTD_FRAME_INPUT`` plain bytes (the last one shorter), then the end marker.

    Whole frames are compressed straight from the caller's chunks; only a frame that spans chunks
    is gathered (at most one frame's bytes held)."""
    zc = _zstd_compressor(level, 0)
    pending = bytearray()
    total = 0
    for chunk in chunks:
        total += len(chunk)
        with memoryview(chunk) as view:
            start = 0
            if pending:
                start = min(len(view), ZSTD_FRAME_INPUT - len(pending))
                pending += view[:start]
                if len(pending) == ZSTD_FRAME_INPUT:
                    yield from _pieces(zc.compress(pending))
                    pending.clear()
            while len(view) - start >= ZSTD_FRAME_INPUT:
                yield from _pieces(zc.compress(view[start : start + ZSTD_FRAME_INPUT]))
                start += ZSTD_FRAME_INPUT
            pending += view[start:]
    if pending:
        yield from _pieces(zc.compress(pending))
    yield _END.pack(_END_MAGIC, 8, total)


def buffer_frame_input(codec: str, size: int) -> int:
    """The header's ``zstd_frame`` for ``compress_buffer`` of ``size`` bytes; 0: one frame."""
    return ZSTD_FRAME_INPUT if codec == "zstd" and size > ZSTD_FRAME_INPUT else 0


def compress_buffer(data: bytes | bytearray | memoryview, codec: str, level: int | None = None, threads: int = 0) -> list[bytes]:
    """``data`` compressed in one call per frame, as body parts: the stream format of ``compress_stream``;
    zstd input over one frame is framed (``buffer_frame_input``), frames compressed by up to ``threads`` threads.

    For inputs already in memory (WAL segments): zstd then compresses in place instead of copying
    its input into a window buffer, about 20% less CPU than 1 MiB streaming calls (measured here)."""
    lvl = DEFAULT_LEVELS[check_codec(codec)] if level is None else level
    if codec == "none":
        return [bytes(data)]
    if codec == "zstd":
        if buffer_frame_input(codec, len(data)):
            with memoryview(data) as view:
                return [*_zstd_frames_parallel(view, lvl, threads), _END.pack(_END_MAGIC, 8, len(view))]
        return [_zstd_compressor(lvl, 0).compress(data)]
    if codec == "lz4":
        import lz4.frame

        out: bytes = lz4.frame.compress(data, compression_level=lvl)
        return [out]
    gz = zlib.compressobj(lvl, zlib.DEFLATED, 31)
    return [gz.compress(data) + gz.flush()]


def _zstd_frames_parallel(data: memoryview, level: int, threads: int) -> list[bytes]:
    """``_zstd_frames``' frames of ``data``, each compressed in one call straight from ``data`` by one of up to
    ``threads`` threads (this one included), each with a single-threaded compressor.  zstd's own worker
    threads would first copy the input into their job buffers: on a 16 MiB WAL segment here they touched
    twice the memory (5,800 page faults against 3,000 per process) and took 35 ms against 26, same size.

    Threads come from ``_thread``: ``threading`` costs about 1 ms of every archive_command to import."""
    import _thread
    import itertools

    views = [data[i : i + ZSTD_FRAME_INPUT] for i in range(0, len(data), ZSTD_FRAME_INPUT)]
    frames = [b""] * len(views)
    claim = itertools.count()  # next() is atomic: each frame is taken once
    errors: list[BaseException] = []

    def work() -> None:
        try:
            zc = _zstd_compressor(level, 0)
            while not errors and (i := next(claim)) < len(views):
                frames[i] = zc.compress(views[i])
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    def helper(done: _thread.LockType) -> None:
        try:
            work()
        finally:
            done.release()

    helpers = []
    try:
        for _ in range(min(threads, len(views)) - 1):
            done = _thread.allocate_lock()
            done.acquire()
            _thread.start_new_thread(helper, (done,))
            helpers.append(done)
        work()
    finally:
        for done in helpers:  # every helper has finished with ``data`` before the caller may release it
            done.acquire()
        for view in views:
            view.release()
    if errors:
        raise errors[0]
    return frames


def _pieces(out: bytes) -> Iterator[bytes]:
    """zstd's worker threads hand back whole jobs (several MiB): pass them on in 1 MiB pieces."""
    if len(out) <= OUT_PIECE:
        if out:
            yield out
        return
    view = memoryview(out)
    for i in range(0, len(view), OUT_PIECE):
        yield bytes(view[i : i + OUT_PIECE])


def _slices(chunks: Iterable[bytes]) -> Iterator[memoryview]:
    """A compressed chunk can expand a hundredfold in one call: hand decompressors small slices."""
    for chunk in chunks:
        view = memoryview(chunk)
        for i in range(0, len(view), DECODE_SLICE):
            yield view[i : i + DECODE_SLICE]


def _zstd_unframe(pieces: Iterator[memoryview]) -> Iterator[bytes]:
    """Decode ``_zstd_frames`` output: every frame, then the end marker, which must count every plain
    byte and end the stream (a body cut at a frame boundary is refused, as a cut frame is)."""
    dctx = zstandard.ZstdDecompressor()
    buf = b""  # input not yet given to a frame
    frame = None  # the frame being decoded
    total = 0
    while True:
        if frame is None:  # at a frame boundary: a frame or the end marker follows
            while len(buf) < _END.size and (piece := next(pieces, None)) is not None:
                buf += piece
            if len(buf) >= 4 and int.from_bytes(buf[:4], "little") & 0xFFFFFFF0 == _END_MAGIC & 0xFFFFFFF0:  # skippable
                if len(buf) < _END.size:
                    raise IntegrityError("compressed stream is truncated (zstd end marker incomplete)")
                magic, length, size = _END.unpack_from(buf)
                if magic != _END_MAGIC or length != 8:
                    raise IntegrityError("corrupt zstd stream: a skippable frame that is not saveit's end marker")
                if size != total:
                    raise IntegrityError(f"corrupt zstd stream: end marker says {size} bytes, the frames held {total}")
                if len(buf) > _END.size or next(pieces, None) is not None:
                    raise IntegrityError("corrupt zstd stream: data after its end marker")
                return
            if not buf:
                raise IntegrityError("compressed stream is truncated (no zstd end marker)")
            frame, data, buf = dctx.decompressobj(), memoryview(buf), b""
        else:
            piece = next(pieces, None)
            if piece is None:
                raise IntegrityError("compressed stream is truncated (zstd frame incomplete)")
            data = piece
        out = frame.decompress(data)
        if out:
            total += len(out)
            yield out
        if frame.eof:
            buf, frame = frame.unused_data, None


def decompress_stream(chunks: Iterable[bytes], codec: str, zstd_framed: bool = False) -> Iterator[bytes]:
    """Inverse of the compressors; ``zstd_framed``: the header's ``zstd_frame`` (frames and an end marker)."""
    if codec == "none":
        yield from chunks
        return
    try:
        if codec == "zstd" and zstd_framed:
            yield from _zstd_unframe(_slices(chunks))
        elif codec == "zstd":
            zd = zstandard.ZstdDecompressor().decompressobj()
            for chunk in _slices(chunks):
                out = zd.decompress(chunk)
                if out:
                    yield out
            if not zd.eof:
                raise IntegrityError("compressed stream is truncated (zstd frame incomplete)")
            if zd.unused_data:  # one frame means one: e.g. a framed body read without its header's zstd_frame
                raise IntegrityError("corrupt zstd stream: data after its frame")
        elif codec == "lz4":
            import lz4.frame

            ld = lz4.frame.LZ4FrameDecompressor()
            for chunk in _slices(chunks):
                out = ld.decompress(chunk)
                if out:
                    yield out
            if not ld.eof:
                raise IntegrityError("compressed stream is truncated (lz4 frame incomplete)")
        elif codec == "gzip":
            gd = zlib.decompressobj(31)
            for chunk in _slices(chunks):
                out = gd.decompress(chunk)
                if out:
                    yield out
            tail = gd.flush()
            if tail:
                yield tail
            if not gd.eof:
                raise IntegrityError("compressed stream is truncated (gzip member incomplete)")
        else:
            raise IntegrityError(f"object uses unknown compression {codec!r}", hint="upgrade saveit-backup")
    except IntegrityError:
        raise
    except Exception as exc:  # codec libraries raise their own error types
        raise IntegrityError(f"corrupt {codec} stream: {exc}") from exc


class ChunkReader(io.RawIOBase):
    """A raw file object over an iterator of byte chunks; closing it closes the iterator and ``sources``
    (what the chunks are made from: a storage stream may hold a concurrency permit until closed),
    whether or not anything was read."""

    def __init__(self, chunks: Iterable[bytes | memoryview], *sources: object) -> None:
        self._chunks = chunks
        self._sources = sources
        self._it = iter(chunks)
        self._view = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _current(self) -> memoryview:
        """The unread rest of the current chunk; empty at the end."""
        while not self._view:
            try:
                self._view = memoryview(next(self._it)).cast("B")
            except StopIteration:
                break
        return self._view

    def readinto(self, b: Any) -> int:
        view = self._current()
        with memoryview(b) as target, target.cast("B") as out:
            n = min(out.nbytes, view.nbytes)
            out[:n] = view[:n]
        self._view = view[n:]
        return n

    def read(self, size: int | None = -1) -> bytes:
        """At most ``size`` bytes of the current chunk: a whole chunk is returned without a copy."""
        if size is None or size < 0:
            return self.readall()
        view = self._current()
        n = min(size, view.nbytes)
        obj = view.obj
        out = obj if isinstance(obj, bytes) and n == len(obj) else bytes(view[:n])  # n == len: the whole chunk
        self._view = view[n:]
        return out

    def close(self) -> None:
        if not self.closed:
            self._view = memoryview(b"")
            _close_all([self._it, self._chunks, *self._sources])
        super().close()


def _close_all(sources: list[object]) -> None:
    """Close each source that can be closed; every one is tried, the first error is raised."""
    if not sources:
        return
    try:
        close = getattr(sources[0], "close", None)
        if close is not None:
            close()
    finally:
        _close_all(sources[1:])


class _ZstdReader(io.RawIOBase):
    """zstd frames (and skippable frames, such as the end marker) decompressed straight into the
    caller's buffer: no copy of the plain bytes.  The caller checks the plain size it expects: a cut
    stream just ends early here."""

    def __init__(self, source: ChunkReader) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(cast("IO[bytes]", source), read_size=DECODE_READ,
                                                                   read_across_frames=True)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            n: int = self._reader.readinto(b)
        except zstandard.ZstdError as exc:  # errors of the layers below (decryption, storage) pass unchanged
            raise IntegrityError(f"corrupt zstd stream: {exc}") from exc
        return n

    def close(self) -> None:
        if not self.closed:
            self._reader.close()  # type: ignore[no-untyped-call]  # closes the source too
        super().close()


def decompress_reader(chunks: Iterable[bytes], codec: str, zstd_framed: bool = False,
                      source: Iterable[bytes] | None = None) -> io.RawIOBase:
    """The plain bytes of ``chunks`` as a raw file object (``readinto``); zstd decompresses straight
    into the caller's buffer, other codecs go through ``decompress_stream``.  Closing it closes
    ``chunks`` and ``source`` (what ``chunks`` are made from)."""
    if codec == "zstd":
        return _ZstdReader(ChunkReader(chunks, source))
    return ChunkReader(decompress_stream(chunks, codec, zstd_framed), chunks, source)
