"""Block-level differential and incremental physical backups, and the one-pass restore of a chain.

Backup side (local mode): the *reference* is the newest good local-mode physical backup of the same
cluster and timeline (``incr``: any type; ``diff``: the newest full).  Relation main-fork files that
the reference holds are read once, in runs of ``READ_BLOCKS`` pages: every page is hashed, checked
(``FileReader``) and kept when its page LSN (``pd_lsn``) is at or after the reference's start LSN, is
zero (new or re-extended), or lies beyond the reference file's size; the kept pages form a *block
delta* (format in docs/format.md).  With page XOR (``BACKUP_INCREMENTAL_XOR``) the reference's copy of
the file is read back from the repository alongside, and a kept page the reference has is stored as
its XOR with the reference's page: mostly zeros, since an update changes a few bytes of a page.
Every other file is hashed and stored whole when its size or digest differs from the reference.
Files that did not change are described by the reference's own entry, so every manifest entry is
self-contained: ``kind: full`` (an object, in ``backup``) or ``kind: incremental`` (a ``base`` slice
plus the ordered ``deltas``).

Restore side: for each file, the base slice is read sequentially and each run of blocks gets the
deltas' records applied oldest first (a page replaces the block, an XOR record is XORed into it):
one pass, no intermediate copies.  Memory per file: one run, the base's stream buffers and the
deltas as stored (compressed), decoded as they are read.  Base slices and delta slices are checked
against their digests while they stream.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from saveit_backup.domain.manifest import Manifest, ObjectEntry
from saveit_backup.errors import BackupNotFound, IntegrityError
from saveit_backup.pg import pagecheck
from saveit_backup.pipeline import digests
from saveit_backup.pipeline.envelope import Digest, EncodeOptions, decode
from saveit_backup.pipeline.threads import read_ahead
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository

log = logging.getLogger(__name__)

DELTA_MAGIC = b"SVBK"
DELTA_PLAIN = 1  # records are the pages themselves
DELTA_XOR = 2  # records below the reference's size are XOR with the reference's page
_DELTA_HEADER = struct.Struct(">4sB3xI")  # magic, version, pad, block size
_REF_BLOCKS = struct.Struct(">I")  # version 2: the reference file's size in blocks, after the header
_BLOCKNO = struct.Struct(">I")
_END = 0xFFFFFFFF
READ_BLOCKS = 128  # pages per read (1 MiB at 8 KiB)
CACHE_BYTES = 64 << 20  # decoded pack objects (up to 16 MiB each) kept in memory during a restore
NO_REFERENCE = "no reference full backup"


# --- which files are relation files -------------------------------------------------------------
def is_relation_main_fork(path: str) -> bool:
    """``base/<db>/<relfilenode>[.<seg>]``, ``global/<relfilenode>[.<seg>]``, tablespace likewise; not _fsm/_vm/_init."""
    parts = path.split("/")
    if not (parts[0] in ("base", "global") or (parts[0] == "pg_tblspc" and len(parts) > 3)):
        return False
    name = parts[-1]
    head, _, seg = name.partition(".")
    return head.isdigit() and (seg == "" or seg.isdigit())


# --- the reference -------------------------------------------------------------------------------
@dataclass
class Reference:
    manifest: Manifest
    start_lsn: int
    chain: list[str]  # full first, the reference last
    files: dict[str, dict[str, Any]]  # path -> the reference's entry, resolved (backup and kind set)


def resolved(entry: dict[str, Any], backup_id: str) -> dict[str, Any]:
    """An entry with ``kind`` and ``backup`` spelled out (entries of full backups omit them)."""
    out = dict(entry)
    out.setdefault("kind", "full")
    if out["kind"] == "full":
        out.setdefault("backup", backup_id)
    return out


def chain_of(repo: Repository, m: Manifest, cache: dict[str, Manifest] | None = None) -> list[Manifest]:
    """The manifests ``m`` depends on, full first, ``m`` last.  BackupNotFound when one is missing."""
    cache = cache if cache is not None else {}
    out = [m]
    seen = {m.id}
    while out[0].type != "full":
        parent = out[0].parent
        if not parent or parent in seen:
            raise IntegrityError(f"backup {out[0].id} ({out[0].type}) has no usable parent")
        seen.add(parent)
        pm = cache.get(parent) or repo.load_manifest(parent)
        cache[parent] = pm
        out.insert(0, pm)
    return out


def find_reference(repo: Repository, kind: str, system_identifier: str, timeline: int,
                   mode: str = "local") -> tuple[Reference | None, str]:
    """The backup a ``diff``/``incr`` is taken against, or (None, why not).

    ``mode``: local references need per-file entries (a local-mode backup); remote ones the server's
    ``backup_manifest`` stored with the backup (``ops/native_incremental.py``)."""
    cache: dict[str, Manifest] = {}
    physical = []
    for m in repo.manifests():
        cache[m.id] = m
        if m.type in ("full", "diff", "incr") and m.physical.get("start_lsn"):
            physical.append(m)
    wanted = [m for m in physical if m.type == "full"] if kind == "diff" else physical
    if not wanted:
        return None, NO_REFERENCE
    ref = max(wanted, key=lambda m: (m.started, m.id))
    if not ref.checksum_ok:
        return None, f"the newest {'full ' if kind == 'diff' else ''}backup {ref.id} failed verification (manifest checksum)"
    if mode == "local" and ref.physical.get("mode") != "local":
        return None, f"the newest backup {ref.id} was taken in remote mode (no per-file manifest)"
    if mode == "remote" and ref.physical.get("mode") != "remote":
        return None, f"the newest backup {ref.id} was taken in local mode (no backup_manifest from the server)"
    if mode == "remote" and not ref.physical.get("archive", {}).get("manifest_object"):
        return None, (f"the newest backup {ref.id} has no stored backup_manifest (taken with server-side compression, "
                      "which cannot carry it, or by an older version)")
    if ref.system_identifier != system_identifier:
        return None, f"the newest backup {ref.id} belongs to another cluster (system identifier {ref.system_identifier})"
    if int(ref.physical.get("timeline", 0)) != timeline:
        return None, f"the timeline changed since backup {ref.id} ({ref.physical.get('timeline')} -> {timeline})"
    try:
        members = chain_of(repo, ref, cache)
    except (BackupNotFound, IntegrityError) as exc:
        return None, f"the chain of backup {ref.id} is broken: {exc}"
    bad = [m.id for m in members if not m.checksum_ok]
    if bad:
        return None, f"backup {bad[0]} in the chain of {ref.id} failed verification"
    from saveit_backup.domain.wal import Lsn

    files = {f["path"]: resolved(f, ref.id) for f in ref.physical.get("files", [])}
    return Reference(ref, int(Lsn.parse(ref.physical["start_lsn"])), [m.id for m in members], files), ""


# --- the block-delta format ----------------------------------------------------------------------
def delta_header(block_size: int, ref_blocks: int | None = None) -> bytes:
    """Version 1 (pages as they are), or version 2 when ``ref_blocks`` is given (XOR below it)."""
    if ref_blocks is None:
        return _DELTA_HEADER.pack(DELTA_MAGIC, DELTA_PLAIN, block_size)
    return _DELTA_HEADER.pack(DELTA_MAGIC, DELTA_XOR, block_size) + _REF_BLOCKS.pack(ref_blocks)


def delta_trailer() -> bytes:
    return _BLOCKNO.pack(_END)


def changed_rows(chunk: bytes, first_block: int, ref_blocks: int, start_lsn: int, block_size: int) -> Any:
    """Indices (into ``chunk``'s pages) of the pages to keep: changed since ``start_lsn``, all-zero LSN (new or
    re-extended), or at or beyond the reference's size.  ``pd_lsn`` is the page's first 8 bytes (xlogid,
    xrecoff, little-endian uint32)."""
    import numpy as np  # in the functions that use it: full backups and restores never load numpy (50-70 ms, idle BLAS threads)

    n = len(chunk) // block_size
    head = np.frombuffer(chunk, "<u4", count=n * block_size // 4).reshape(n, block_size // 4)[:, :2].astype(np.uint64)
    lsn = head[:, 0] << np.uint64(32) | head[:, 1]
    keep = (lsn >= np.uint64(start_lsn)) | (lsn == 0) | (np.arange(first_block, first_block + n) >= ref_blocks)
    return np.flatnonzero(keep)


class ByteStream:
    """Exact-size reads over an iterator of chunks; hashes what passes to check it against ``expected``
    (a recorded digest; None: unchecked)."""

    def __init__(self, chunks: Iterable[bytes], expected: str | None = None) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self._pos = 0
        self.expected = expected or ""
        self.hash = digests.like(expected) if expected is not None else None
        self.consumed = 0

    def read(self, n: int) -> bytes:
        parts = []
        want = n
        while want > 0:
            if self._pos >= len(self._buf):
                nxt = next(self._it, None)
                if nxt is None:
                    break
                self._buf, self._pos = bytes(nxt), 0
                continue
            take = self._buf[self._pos : self._pos + want]
            self._pos += len(take)
            want -= len(take)
            parts.append(take)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.hash is not None:
            self.hash.update(data)
        self.consumed += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        """Close the source (a storage stream holds a permit until it is exhausted or closed)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class DeltaReader:
    """The records of one block delta of ``length`` bytes, read in batches of ``READ_BLOCKS`` and taken by
    block range (``take_until``).  ``xor_below``: records of blocks under it are XOR with the previous
    layer's page (0 for version 1)."""

    def __init__(self, stream: ByteStream, what: str, length: int) -> None:
        head = stream.read(_DELTA_HEADER.size)
        if len(head) != _DELTA_HEADER.size:
            raise IntegrityError(f"{what}: truncated block delta")
        magic, version, self.block_size = _DELTA_HEADER.unpack(head)
        if magic != DELTA_MAGIC or version not in (DELTA_PLAIN, DELTA_XOR):
            raise IntegrityError(f"{what}: not a block delta of version {DELTA_PLAIN} or {DELTA_XOR}",
                                 hint="written by a newer saveit-backup? restore with that version")
        self.xor_below = 0
        body = length - _DELTA_HEADER.size - _BLOCKNO.size
        if version == DELTA_XOR:
            raw = stream.read(_REF_BLOCKS.size)
            if len(raw) != _REF_BLOCKS.size:
                raise IntegrityError(f"{what}: truncated block delta")
            (self.xor_below,) = _REF_BLOCKS.unpack(raw)
            body -= _REF_BLOCKS.size
        self.record = _BLOCKNO.size + self.block_size
        if body < 0 or body % self.record:
            raise IntegrityError(f"{what}: {length} bytes is not a whole number of {self.block_size}-byte records")
        self.stream, self.what = stream, what
        self.left = body // self.record  # records not read yet
        self.last = -1
        self.blocks: Any = None  # the current batch: block numbers (int64) and records (rows of uint8)
        self.records: Any = None
        self.at = 0
        self.ended = False

    def _batch(self) -> bool:
        """Read the next batch; False at the end (after checking the end marker)."""
        import numpy as np

        if not self.left:
            if not self.ended:
                if self.stream.read(_BLOCKNO.size) != _BLOCKNO.pack(_END):
                    raise IntegrityError(f"{self.what}: block delta ends without its end marker")
                self.ended = True
            self.blocks = None
            return False
        n = min(self.left, READ_BLOCKS)
        raw = self.stream.read(n * self.record)
        if len(raw) != n * self.record:
            raise IntegrityError(f"{self.what}: truncated block delta")
        rows = np.frombuffer(raw, np.uint8).reshape(n, self.record)
        blocks = rows[:, : _BLOCKNO.size].copy().view(">u4").reshape(n).astype(np.int64)
        if blocks[0] <= self.last or (n > 1 and not bool(np.all(blocks[1:] > blocks[:-1]))):
            raise IntegrityError(f"{self.what}: block delta is not sorted")
        if int(blocks[-1]) == _END:
            raise IntegrityError(f"{self.what}: end marker inside the block delta")
        self.left -= n
        self.last = int(blocks[-1])
        self.blocks, self.records, self.at = blocks, rows[:, _BLOCKNO.size :], 0
        return True

    def next_block(self) -> int | None:
        """The block number of the next record, or None after the last."""
        if (self.blocks is None or self.at == len(self.blocks)) and not self._batch():
            return None
        return int(self.blocks[self.at])

    def take_until(self, end: int) -> tuple[Any, Any]:
        """The records of blocks below ``end``: (block numbers, records as rows), consumed."""
        import numpy as np

        blocks, records = [], []
        while (nxt := self.next_block()) is not None and nxt < end:
            stop = self.at + int(np.searchsorted(self.blocks[self.at :], end))
            blocks.append(self.blocks[self.at : stop])
            records.append(self.records[self.at : stop])
            self.at = stop
        if len(blocks) == 1:
            return blocks[0], records[0]
        if not blocks:
            return np.empty(0, np.int64), np.empty((0, self.block_size), np.uint8)
        return np.concatenate(blocks), np.concatenate(records)

    def drain(self) -> None:
        while self.next_block() is not None:
            self.at = len(self.blocks)


# --- backup: producing the entries of a diff/incr ------------------------------------------------
@dataclass
class IncrementalWork:
    """What one backup file turns into: filled in by ``produce``."""

    entry: Any  # physical.FileEntry
    ref: dict[str, Any] | None
    out: dict[str, Any] = field(default_factory=dict)


@dataclass
class IncrStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    files_full: int = 0
    files_delta: int = 0
    files_unchanged: int = 0
    pages_read: int = 0
    pages_stored: int = 0
    pages_xor: int = 0

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, int]:
        return {"files_full": self.files_full, "files_incremental": self.files_delta, "files_unchanged": self.files_unchanged,
                "pages_read": self.pages_read, "pages_stored": self.pages_stored, "pages_xor": self.pages_xor}


def _records(chunk: bytes, first: int, rows: Any, block_size: int, window: bytes | memoryview | None, ref_blocks: int,
             path: str) -> bytes:
    """Delta records of ``chunk``'s pages ``rows`` (block number, then the page).  With ``window`` (the
    reference's run of READ_BLOCKS blocks holding block ``first``), pages of blocks below ``ref_blocks`` are
    XOR with the reference's."""
    import numpy as np

    out = np.empty((len(rows), _BLOCKNO.size + block_size), np.uint8)
    out[:, _BLOCKNO.size :] = np.frombuffer(chunk, np.uint8).reshape(-1, block_size)[rows]
    out[:, : _BLOCKNO.size] = (rows + first).astype(">u4").view(np.uint8).reshape(len(rows), _BLOCKNO.size)
    if window is not None:
        ref_pages = np.frombuffer(window, np.uint8).reshape(-1, block_size)
        inside = rows + first < ref_blocks
        at = rows[inside] + first % READ_BLOCKS
        if len(at) and int(at[-1]) >= len(ref_pages):
            raise IntegrityError(f"{path}: block {first + int(rows[inside][-1])} is not in the reference's copy",
                                 hint="take a full backup (backup --type full)")
        out[inside, _BLOCKNO.size :] ^= ref_pages[at]
    return out.tobytes()


class DeltaProducer:
    """Reads PGDATA files for a diff/incr and yields the bytes to store for each (maybe none)."""

    def __init__(self, reader: Any, ref: Reference, bid: str, block_size: int, blocks_per_segment: int,
                 open_reference: Callable[[dict[str, Any]], Iterator[bytes | memoryview]] | None = None) -> None:
        self.reader = reader  # physical.FileReader
        self.ref = ref
        self.bid = bid
        self.block_size = block_size
        self.blocks_per_segment = blocks_per_segment
        self.open_reference = open_reference  # a file's reference content in runs of READ_BLOCKS: XOR deltas when set
        self.stats = IncrStats()

    def _open(self, work: IncrementalWork) -> int | None:
        try:
            return os.open(self.reader.real_path(work.entry.path), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def produce(self, work: IncrementalWork) -> Iterator[bytes]:
        """Bytes to store for this file (whole file or block delta); sets ``work.out`` to the manifest entry."""
        e, ref = work.entry, work.ref
        meta = {"path": e.path, "mode": e.mode, "mtime": int(e.mtime)}
        if ref is None:
            yield from self._whole(work, meta, None)
            return
        fd = self._open(work)
        if fd is None:  # dropped meanwhile: an empty file, WAL replay removes it
            work.out = meta | {"kind": "full", "backup": self.bid, "size": 0, "digest": digests.of_bytes(b"")}
            self.stats.add(files_full=1)
            e.size = 0
            return
        try:
            st = os.fstat(fd)
            if (is_relation_main_fork(e.path) and ref.get("size", 0) % self.block_size == 0
                    and st.st_size % self.block_size == 0):
                yield from self._delta(work, fd, meta, ref)
            else:
                yield from self._whole(work, meta, fd)
        finally:
            os.close(fd)

    def _whole(self, work: IncrementalWork, meta: dict[str, Any], fd: int | None) -> Iterator[bytes]:
        """Store the file whole unless its digest equals the reference's (one of another algorithm never does)."""
        e, ref = work.entry, work.ref
        if ref is not None and fd is not None:
            h = digests.new()
            size = 0
            small = os.fstat(fd).st_size < (16 << 20)
            held: list[bytes] = []
            while chunk := os.pread(fd, 1 << 20, size):
                h.update(chunk)
                size += len(chunk)
                if small:
                    held.append(chunk)
            e.size, e.digest = size, digests.tagged(h)
            if size == ref.get("size") and e.digest == digests.recorded(ref, required=False):  # another algorithm: changed
                work.out = ref | {"mode": e.mode, "mtime": int(e.mtime)}
                self.stats.add(files_unchanged=1)
                return
            if small:
                work.out = meta | {"kind": "full", "backup": self.bid, "size": size, "digest": e.digest, "length": size}
                self.stats.add(files_full=1)
                yield from held
                return
        n = 0
        for chunk in self.reader.chunks(e):
            n += len(chunk)
            yield chunk
        work.out = meta | {"kind": "full", "backup": self.bid, "size": e.size, "digest": e.digest, "length": n}
        self.stats.add(files_full=1)

    def _delta(self, work: IncrementalWork, fd: int, meta: dict[str, Any], ref: dict[str, Any]) -> Iterator[bytes]:
        import numpy as np

        e = work.entry
        bs = self.block_size
        ref_blocks = int(ref["size"]) // bs
        segno = pagecheck.relation_segment(e.path) or 0
        checking = self.reader.checks.enabled and bs == pagecheck.BLCKSZ
        xor = self.open_reference is not None and ref_blocks > 0
        windows: Generator[bytes | memoryview, None, None] | None = None  # the reference, from its first changed page on
        window: bytes | memoryview | None = None  # the reference's run ``window_no - 1`` (READ_BLOCKS blocks)
        window_no = 0
        h = digests.new()
        dh = digests.new()
        size = 0
        stored = 0
        pages = 0
        kept = 0
        xored = 0
        started = False
        try:
            # Reads end at multiples of READ_BLOCKS, as the reference's runs do, even after a short read
            # (a file growing while it is read).
            while chunk := os.pread(fd, (READ_BLOCKS - size // bs % READ_BLOCKS) * bs, size):
                if len(chunk) % bs:  # a page being appended right now: keep whole pages, WAL replay has the rest
                    chunk = chunk[: len(chunk) - len(chunk) % bs]
                    if not chunk:
                        break
                first = size // bs
                if checking:
                    self.reader._check(fd, e.path, chunk, segno * self.blocks_per_segment + first, size)
                h.update(chunk)
                size += len(chunk)
                pages += len(chunk) // bs
                rows = changed_rows(chunk, first, ref_blocks, self.ref.start_lsn, bs)
                if not len(rows):
                    continue
                if not started:
                    head = delta_header(bs, ref_blocks if xor else None)
                    dh.update(head)
                    stored += len(head)
                    started = True
                    yield head
                below = int(np.count_nonzero(rows + first < ref_blocks)) if xor else 0  # rows to XOR
                if below:
                    if windows is None:
                        assert self.open_reference is not None
                        windows = read_ahead(self.open_reference(ref), depth=2)
                    while window_no <= first // READ_BLOCKS:
                        window = next(windows, None)
                        window_no += 1
                        if window is None:
                            raise IntegrityError(f"{e.path}: the reference backup's copy is shorter than its manifest says",
                                                 hint="take a full backup (backup --type full)")
                records = _records(chunk, first, rows, bs, window if below else None, ref_blocks, e.path)
                xored += below
                dh.update(records)
                stored += len(records)
                kept += len(rows)
                yield records
        finally:
            if windows is not None:  # read only as far as the last changed page: release its storage stream now
                windows.close()
        e.size, e.digest = size, digests.tagged(h)
        self.stats.add(pages_read=pages, pages_stored=kept, pages_xor=xored)
        if not started and size == int(ref["size"]):
            work.out = ref | {"mode": e.mode, "mtime": int(e.mtime)}
            self.stats.add(files_unchanged=1)
            return
        if not started:  # truncated only: an empty delta records the new size
            head = delta_header(bs)
            dh.update(head)
            stored += len(head)
            yield head
        tail = delta_trailer()
        dh.update(tail)
        stored += len(tail)
        yield tail
        if ref["kind"] == "full":
            base = {k: ref[k] for k in ("backup", "object", "offset", "size")} | {"digest": digests.recorded(ref)}
            if "length" in ref:
                base["length"] = ref["length"]
            deltas: list[dict[str, Any]] = []
        else:
            base, deltas = dict(ref["base"]), list(ref["deltas"])
        work.out = meta | {"kind": "incremental", "size": size, "digest": e.digest, "block_size": bs, "base": base,
                           "deltas": [*deltas, {"backup": self.bid, "length": stored, "digest": digests.tagged(dh)}]}
        self.stats.add(files_delta=1)


def store_incremental(repo: Repository, bid: str, name: str, works: list[IncrementalWork], producer: DeltaProducer,
                      options: EncodeOptions, big: int) -> ObjectEntry | None:
    """One object (a pack, or one big file) of a diff/incr; None when nothing in it changed."""
    own = len(works) == 1 and (works[0].entry.size >= big)

    def packed() -> Iterator[bytes]:
        offset = 0
        for w in works:
            start = offset
            for chunk in producer.produce(w):
                offset += len(chunk)
                yield chunk
            if offset > start:
                place = w.out["deltas"][-1] if w.out.get("kind") == "incremental" and w.out["deltas"][-1]["backup"] == bid \
                    else w.out
                place["object"], place["offset"] = name, start
                if own:
                    place["own"] = True

    gen = packed()
    first = next(gen, None)
    if first is None:
        return None
    digest: Digest = repo.put_object(layout.object_key(bid, name), chain([first], gen), options)
    return ObjectEntry(name, digest.plain_size, digest.stored_size, digest.plain_digest, digest.codec, digest.cipher)


# --- restore: one-pass reconstruction --------------------------------------------------------------
class PackCache:
    """Decoded objects (packs) shared by restore threads, least recently used out first."""

    def __init__(self, repo: Repository, capacity: int = CACHE_BYTES) -> None:
        self.repo = repo
        self.capacity = capacity
        self.items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, backup: str, name: str) -> bytes:
        key = (backup, name)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        data = b"".join(self.repo.read_object(layout.object_key(backup, name)))
        with self.lock:
            if key not in self.items:
                self.items[key] = data
                self.size += len(data)
                while self.size > self.capacity and len(self.items) > 1:
                    _, old = self.items.popitem(last=False)
                    self.size -= len(old)
        return data


def _own(ref: dict[str, Any]) -> bool:
    return bool(ref.get("own")) or (int(ref.get("offset", 0)) == 0 and str(ref["object"]).startswith("f"))


def slice_bytes(repo: Repository, cache: PackCache, ref: dict[str, Any], length: int, expected: str | None = None) -> ByteStream:
    """The bytes of one file (or delta) inside an object: a pack's through the cache; an object of its own is
    held as stored (compressed) and decoded as it is read, since a delta's plain bytes can be hundreds of MB."""
    backup, name, offset = ref["backup"], ref["object"], int(ref.get("offset", 0))
    if _own(ref):
        key = layout.object_key(backup, name)
        return ByteStream(decode([b"".join(repo.storage.open(key))], repo.keyring, what=key), expected)
    data = cache.get(backup, name)
    if offset + length > len(data):
        raise IntegrityError(f"backup {backup}: object {name} is shorter than the manifest says")
    view = memoryview(data)[offset : offset + length]
    return ByteStream([bytes(view[i : i + (1 << 20)]) for i in range(0, length, 1 << 20)] if length else [], expected)


def merged(entry: dict[str, Any], base: ByteStream, deltas: list[tuple[ByteStream, dict[str, Any]]]) -> Iterator[bytes | memoryview]:
    """The file ``entry`` describes, streamed in runs of ``READ_BLOCKS`` blocks: the base's blocks with each
    delta's records applied in turn, oldest first (a page replaces the block, an XOR record is XORed into
    it).  The digest of the base and of every delta is checked once they are read through."""
    import numpy as np

    try:
        bs = int(entry["block_size"])
        nblocks = int(entry["size"]) // bs
        base_blocks = int(entry["base"]["size"]) // bs
        layers = [DeltaReader(s, f"backup {d['backup']} delta of {entry['path']}", int(d["length"])) for s, d in deltas]
        for layer in layers:
            if layer.block_size != bs:
                raise IntegrityError(f"{layer.what}: block size {layer.block_size}, the manifest says {bs}")
        for start in range(0, nblocks, READ_BLOCKS):
            end = min(nblocks, start + READ_BLOCKS)
            have = max(0, min(end, base_blocks) - start)  # blocks of this run the base holds
            data = base.read(have * bs)
            if len(data) != have * bs:
                raise IntegrityError(f"{entry['path']}: base of backup {entry['base']['backup']} is truncated")
            if not any((nxt := layer.next_block()) is not None and nxt < end for layer in layers):
                if have < end - start:
                    raise IntegrityError(f"{entry['path']}: block {start + have} is in no backup of the chain")
                yield data
                continue
            pages = np.zeros((end - start, bs), np.uint8)
            pages.reshape(-1)[: len(data)] = np.frombuffer(data, np.uint8)
            present = np.zeros(end - start, bool)
            present[:have] = True
            for layer in layers:
                blocks, recs = layer.take_until(end)
                if not len(blocks):
                    continue
                xor = blocks < layer.xor_below
                idx = blocks - start
                if xor.any():
                    if not present[idx[xor]].all():
                        missing = int(idx[xor][~present[idx[xor]]][0]) + start
                        raise IntegrityError(f"{entry['path']}: block {missing} is in no backup of the chain")
                    pages[idx[xor]] ^= recs[xor]
                pages[idx[~xor]] = recs[~xor]
                present[idx[~xor]] = True
            if not present.all():
                raise IntegrityError(f"{entry['path']}: block {start + int(np.argmin(present))} is in no backup of the chain")
            yield pages.reshape(-1).data
        base.drain()
        for layer in layers:
            layer.drain()
        for s, d in [(base, entry["base"]), *((s, d) for s, d in deltas)]:
            if s.hash is not None and not digests.matches(s.hash, s.expected):
                raise IntegrityError(f"{entry['path']}: {'delta' if d is not entry['base'] else 'base'} from backup "
                                     f"{d['backup']} fails its digest check")
    finally:  # also on errors and when abandoned: storage streams hold permits
        for stream in (base, *(s for s, _ in deltas)):
            stream.close()


def open_merged(repo: Repository, cache: PackCache, entry: dict[str, Any], open_lock: threading.Lock,
                check: bool = True) -> Iterator[bytes | memoryview]:
    """The content of an ``incremental`` entry (``check``: the digest of every slice, once read through).
    Only a base with an object of its own is a storage stream; the deltas are read first (``slice_bytes``),
    so a thread never waits for a storage permit while holding one."""
    base_ref = entry["base"]
    held = {id(d): slice_bytes(repo, cache, d, int(d["length"]), digests.recorded(d) if check else None) for d in entry["deltas"]}
    base_digest = digests.recorded(base_ref) if check else None
    if base_digest is not None:
        digests.algorithm_of(base_digest)  # fails before the storage stream (and its permit) is opened
    if _own(base_ref):
        with open_lock:
            base = ByteStream(repo.read_object(layout.object_key(base_ref["backup"], base_ref["object"])), base_digest)
    else:
        base = slice_bytes(repo, cache, base_ref, int(base_ref.get("length", base_ref["size"])), base_digest)
    return merged(entry, base, [(held[id(d)], d) for d in entry["deltas"]])


def reference_windows(repo: Repository, cache: PackCache, entry: dict[str, Any], open_lock: threading.Lock,
                      block_size: int) -> Iterator[bytes | memoryview]:
    """Any resolved file entry (``kind`` full or incremental) as consecutive runs of ``READ_BLOCKS`` blocks,
    unchecked: a diff/incr XORs with exactly these bytes, and restore reads (and checks) the same ones."""
    if entry["kind"] == "incremental":
        yield from open_merged(repo, cache, entry, open_lock, check=False)
        return
    if _own(entry):
        with open_lock:
            stream = ByteStream(repo.read_object(layout.object_key(entry["backup"], entry["object"])))
    else:
        stream = slice_bytes(repo, cache, entry, int(entry.get("length", entry["size"])))
    try:
        left = int(entry["size"])
        while left > 0 and (data := stream.read(min(left, READ_BLOCKS * block_size))):
            left -= len(data)
            yield data
    finally:
        stream.close()


def restore_merged(repo: Repository, cache: PackCache, entry: dict[str, Any], dest: str, open_lock: threading.Lock) -> int:
    """Rebuild one file of a chain at ``dest``.  Its slices are checked (``open_merged``), not the whole file:
    a page the delta left out (LSN older than the reference's start) may differ from the page read in hint
    bits, which change without WAL when the cluster has no data checksums."""
    n = 0
    with open(dest, "wb") as out:
        for data in read_ahead(open_merged(repo, cache, entry, open_lock), depth=2):
            out.write(data)
            n += len(data)
    os.chmod(dest, int(entry.get("mode", 0o600)) & 0o777 or 0o600)
    if entry.get("mtime"):
        os.utime(dest, (entry["mtime"], entry["mtime"]))
    return n


def file_matches(dest: str, entry: dict[str, Any]) -> bool:
    """--delta: the file on disk has the size and digest the backup read."""
    try:
        st = os.stat(dest)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
            return False
        expected = digests.recorded(entry)
        h = digests.like(expected)
        with open(dest, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return digests.matches(h, expected)
    except OSError:
        return False
