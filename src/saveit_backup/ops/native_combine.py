"""Restore of a remote-mode chain (PostgreSQL's own incremental base backups) in one pass over its tars.

Each backup of the chain is a tar stream read once, newest first; nothing is extracted twice:

* the newest backup's regular files go straight into the target (its ``backup_label`` without the
  ``INCREMENTAL FROM`` lines, which would make the server refuse the directory; no ``backup_manifest``),
  and its ``INCREMENTAL.<name>`` files are spooled: they hold only changed blocks;
* each older incremental contributes the files still *pending* (a relation file whose newest version is
  incremental), spooled as they are (incremental, or whole when the file was new then, which ends the
  search for that file);
* the full backup's tar comes last: a pending file is rebuilt while its member streams by.

Rebuilding follows PostgreSQL's rules (``pg_combinebackup``'s reconstruction): an ``INCREMENTAL`` file is a
header of uint32 values (magic ``0xd3ae1f0d``, block count, truncation length in blocks, the block numbers),
padded to a whole block when it holds blocks, then the blocks.  The rebuilt file is as long as the newest
file's truncation length, or longer if its blocks go further; each block comes from the newest file holding
it, where older backups count only below the newest file's truncation length and the search stops at a
whole copy of the file; a block found nowhere is zeros.  The spool lives next to the target (hidden,
removed afterwards) and holds the incrementals' changed blocks, never a copy of the full backup.
"""

from __future__ import annotations

import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from saveit_backup.domain.manifest import Manifest
from saveit_backup.domain.wal import Lsn
from saveit_backup.errors import IntegrityError
from saveit_backup.ops.native_incremental import METHOD

MAGIC = 0xD3AE1F0D
PREFIX = "INCREMENTAL."
RELSEG_BLOCKS = 131072  # blocks per relation segment (1 GiB of 8 KiB), when pg_control does not say
RELATION_DIRS = ("base/", "global/", "pg_tblspc/")  # where the server writes INCREMENTAL files
_HEAD = struct.Struct("<III")  # magic, block count, truncation length (the server's byte order: little-endian here)
COPY = 1 << 20


class Incremental:
    """A spooled ``INCREMENTAL.<name>`` file: its blocks and where each one lies in the spool."""

    def __init__(self, path: Path, block_size: int, what: str, max_blocks: int = RELSEG_BLOCKS) -> None:
        import numpy as np  # here: restores without PostgreSQL 17 incrementals never load numpy

        self.path = path
        with open(path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) != _HEAD.size:
                raise IntegrityError(f"{what}: truncated incremental file")
            magic, count, self.truncation = _HEAD.unpack(head)
            if magic != MAGIC:
                raise IntegrityError(f"{what}: not a PostgreSQL incremental file (magic 0x{magic:08x})")
            if count > max_blocks or self.truncation > max_blocks:
                raise IntegrityError(f"{what}: {count} blocks, truncation length {self.truncation}: more than a "
                                     f"segment ({max_blocks} blocks)")
            raw = f.read(4 * count)
        if len(raw) != 4 * count:
            raise IntegrityError(f"{what}: truncated incremental file")
        self.blocks = np.frombuffer(raw, "<u4").astype(np.int64)
        if count and int(self.blocks.max()) >= max_blocks:
            raise IntegrityError(f"{what}: block {int(self.blocks.max())} is beyond a segment ({max_blocks} blocks)")
        header = _HEAD.size + 4 * count
        if count and header % block_size:
            header += block_size - header % block_size
        self.data_at = header
        if path.stat().st_size < header + count * block_size:
            raise IntegrityError(f"{what}: incremental file shorter than its {count} blocks")


class _Pending:
    """A file whose newest version is incremental: its incremental files so far, newest first."""

    def __init__(self, newest: Incremental) -> None:
        self.sources = [newest]


def _member_name(member: tarfile.TarInfo, backup_id: str) -> str:
    name = member.name[2:] if member.name.startswith("./") else member.name
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise IntegrityError(f"backup {backup_id}: unsafe path {member.name!r} in the archive")
    return name


def _bare(name: str) -> str | None:
    """``dir/INCREMENTAL.x`` -> ``dir/x`` under the relation directories; None for other names."""
    head, _, tail = name.rpartition("/")
    if not tail.startswith(PREFIX) or not name.startswith(RELATION_DIRS):
        return None
    return f"{head}/{tail[len(PREFIX):]}" if head else tail[len(PREFIX):]


def _copy(src: IO[bytes], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, COPY)


def _check_incremental_from(label: bytes, backup: Manifest, older: Manifest) -> None:
    """The server's own record of what ``backup`` was taken against must be ``older``'s start, as
    pg_combinebackup checks: a chain joined wrongly would rebuild blocks over the wrong base."""
    fields = dict(line.split(": ", 1) for line in label.decode("utf-8", "replace").splitlines() if ": " in line)
    lsn, tli = fields.get("INCREMENTAL FROM LSN"), fields.get("INCREMENTAL FROM TLI")
    expected = str(older.physical.get("start_lsn", ""))
    if lsn is None or Lsn.parse(lsn) != Lsn.parse(expected) or (tli and int(tli) != int(older.physical.get("timeline", tli))):
        raise IntegrityError(f"backup {backup.id} was taken against the backup that started at {lsn} (timeline {tli}), "
                             f"not against {older.id} (started at {expected})", hint="the chain is damaged; restore another backup")


def _without_incremental_lines(label: bytes) -> bytes:
    return b"".join(line for line in label.splitlines(keepends=True) if not line.startswith(b"INCREMENTAL FROM"))


def rebuild(dest: Path, pending: _Pending, whole: IO[bytes] | None, whole_size: int, block_size: int) -> None:
    """Write ``dest`` from ``pending``'s incremental files (newest first) and, if given, a whole copy of the
    file (``whole_size`` bytes, read forward only), by the rules in the module docstring."""
    import numpy as np

    sources = pending.sources
    newest = sources[0]
    length = max(newest.truncation, int(newest.blocks.max()) + 1 if len(newest.blocks) else 0)
    origin = np.full(length, -1, np.int64)  # index into ``sources`` (len(sources): the whole copy)
    offset = np.zeros(length, np.int64)  # byte offset of the block in that source
    for n, src in enumerate(sources):
        blocks = src.blocks if n == 0 else src.blocks[src.blocks < newest.truncation]
        slots = np.flatnonzero(src.blocks < (length if n == 0 else newest.truncation))
        free = origin[blocks] == -1
        origin[blocks[free]] = n
        offset[blocks[free]] = src.data_at + slots[free] * block_size
    if whole is not None:
        free = np.flatnonzero(origin[: min(newest.truncation, whole_size // block_size)] == -1)
        origin[free] = len(sources)
        offset[free] = free * block_size
    with ExitStack() as stack:
        handles = [stack.enter_context(open(src.path, "rb")) for src in sources]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as out:
            position = 0  # bytes of ``whole`` consumed
            zero = bytes(block_size)
            for b in range(length):
                n = int(origin[b])
                if n == -1:
                    out.write(zero)
                elif n == len(sources):
                    assert whole is not None
                    while position < b * block_size:  # skip what newer backups replaced
                        skipped = whole.read(min(COPY, b * block_size - position))
                        if not skipped:
                            break
                        position += len(skipped)
                    page = whole.read(block_size)
                    position += len(page)
                    if len(page) != block_size:
                        raise IntegrityError(f"{dest.name}: the whole copy ends before block {b}")
                    out.write(page)
                else:
                    page = os.pread(handles[n].fileno(), block_size, int(offset[b]))
                    if len(page) != block_size:
                        raise IntegrityError(f"{dest.name}: block {b} is missing from an incremental file")
                    out.write(page)


def combine(chain: list[Manifest], target: Path, open_tar: Callable[[Manifest], IO[bytes]]) -> None:
    """Rebuild ``target`` (existing and empty) from a remote chain, full first, reading each tar once."""
    odd = [m.id for m in chain[1:] if m.physical.get("incremental_method") != METHOD]
    if chain[0].type != "full" or len(chain) < 2 or odd:
        raise IntegrityError(f"backup {chain[-1].id}: its chain mixes backup methods ({', '.join(odd) or chain[0].id})")
    control = chain[-1].physical.get("pg_control", {})
    block_size = int(control.get("block_size") or 8192)
    max_blocks = int(control.get("blocks_per_segment") or RELSEG_BLOCKS)
    others = [m.id for m in chain if m.system_identifier != chain[-1].system_identifier]
    if others:
        raise IntegrityError(f"backup {others[0]} belongs to another cluster than {chain[-1].id}, in the same chain")
    spool = Path(tempfile.mkdtemp(prefix=f".{target.name}.spool-", dir=target.parent))
    pending: dict[str, _Pending] = {}
    try:
        for depth, m in enumerate(reversed(chain)):
            newest, is_full = depth == 0, m is chain[0]
            older = None if is_full else chain[len(chain) - 2 - depth]  # the backup this one was taken against
            seen: set[str] = set()
            with open_tar(m) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    name = _member_name(member, m.id)
                    bare = _bare(name) if member.isfile() else None
                    if name == "backup_label" and member.isfile() and older is not None:
                        src = tar.extractfile(member)
                        assert src is not None
                        label = src.read()
                        _check_incremental_from(label, m, older)
                        if newest:
                            (target / name).write_bytes(_without_incremental_lines(label))
                        continue
                    if newest:
                        if member.isdir():
                            (target / name).mkdir(parents=True, exist_ok=True)
                        elif member.issym():
                            (target / name).parent.mkdir(parents=True, exist_ok=True)
                            os.symlink(member.linkname, target / name)
                        elif member.isfile() and name != "backup_manifest":
                            src = tar.extractfile(member)
                            assert src is not None
                            if bare is not None:
                                path = spool / str(depth) / name
                                _copy(src, path)
                                pending[bare] = _Pending(Incremental(path, block_size, f"backup {m.id}: {name}", max_blocks))
                            else:
                                _copy(src, target / name)
                        continue
                    key = bare if bare is not None else name
                    if not member.isfile() or key not in pending or key in seen:
                        continue
                    seen.add(key)
                    src = tar.extractfile(member)
                    assert src is not None
                    if bare is None:  # a whole copy (the full backup's, or the file was new then): rebuild as it streams
                        done = pending.pop(key)
                        rebuild(target / key, done, src, member.size, block_size)
                        for source in done.sources:  # its spooled incremental files are no longer needed
                            source.path.unlink(missing_ok=True)
                        continue
                    path = spool / str(depth) / name
                    _copy(src, path)
                    pending[key].sources.append(Incremental(path, block_size, f"backup {m.id}: {name}", max_blocks))
            if not newest:
                missing = sorted(set(pending) - seen)
                if missing:
                    raise IntegrityError(f"backup {m.id} holds no copy of {missing[0]}, which a newer backup of its "
                                         "chain changed incrementally", hint="the chain is damaged; restore another backup")
        if pending:
            raise IntegrityError(f"no backup of the chain holds a whole copy of {sorted(pending)[0]}")
    finally:
        shutil.rmtree(spool, ignore_errors=True)
