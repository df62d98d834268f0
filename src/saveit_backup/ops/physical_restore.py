"""Physical restore and point-in-time recovery into a data directory, optionally started and watched.

Steps: choose the backup (the newest good full, diff or incr backup whose chain is complete and that
ends before the target, ``domain/pitr.choose_backup``); files of a diff/incr chain are rebuilt in
one pass each, base and block deltas stream-merged (``ops/incremental.py``); a remote-mode chain is
rebuilt in one pass over its tars, newest first (``ops/native_combine.py``); check the target
directory (empty, or ``--force``; never a running server's); restore files in parallel from their
objects, costliest first (packs are sliced, every file's digest is checked against the manifest, and
their files are created by a helper thread while the big files are written, ``_Schedule``; files of
``DIRECT_MIN`` and more are written with O_DIRECT: no dirty pages left at the end), re-create
directories, tablespace links (to the original location, or ``<target>.tblspc/<oid>`` when that is
not empty) and the backup's own WAL in ``pg_wal``; write ``backup_label``/``tablespace_map``,
``recovery.signal`` and the recovery settings in ``postgresql.auto.conf``. ``restore_command`` calls
this same program (``wal-fetch``) with the repository URL and, if one was used, the config file
path; secrets are never written: the restored server needs them in its environment (or in that
config file) to fetch encrypted WAL.

With ``start``: pg_ctl (of the backup's PostgreSQL major) starts the server on a free port (or the given one) with its socket in the data
directory, and waits until recovery reached its end (promoted, paused or shut down per the target
action); the report names the point reached (last replayed transaction time, LSN, timeline).
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from saveit_backup.compose import Context
from saveit_backup.domain.manifest import Manifest
from saveit_backup.domain.pitr import PhysicalBackup, RecoveryTarget, choose_backup, recovery_settings
from saveit_backup.domain.timeline import parse_history
from saveit_backup.domain.wal import Lsn, history_file_name
from saveit_backup.errors import BackupNotFound, ConfigError, IntegrityError, NotFound, PgToolError, RestoreRefused
from saveit_backup.ops import incremental, native_combine
from saveit_backup.ops.progress import Progress
from saveit_backup.pg.cluster import free_port
from saveit_backup.pg.conn import find_tool
from saveit_backup.pipeline import digests, untar
from saveit_backup.pipeline.compress import ChunkReader
from saveit_backup.pipeline.direct_io import BUFFER_SIZE, DirectFiles
from saveit_backup.pipeline.small_files import SmallFiles
from saveit_backup.pipeline.threads import read_ahead
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository

log = logging.getLogger(__name__)

RECOVERY_KEYS = ("restore_command", "recovery_target", "recovery_target_time", "recovery_target_lsn", "recovery_target_xid",
                 "recovery_target_name", "recovery_target_inclusive", "recovery_target_timeline", "recovery_target_action")
LOG_MARKERS = ("starting point-in-time recovery", "starting archive recovery", "consistent recovery state reached",
               "recovery stopping", "last completed transaction", "redo done at", "recovery has paused", "selected new timeline",
               "archive recovery complete", "database system is ready", "FATAL", "PANIC")
START_TIMEOUT = 3600.0
# What creating one file costs, counted in restored bytes, to order objects (_costliest_first).  Measured
# here: a pack's file took 0.4-0.8 ms (ext4 without a journal searches past recently deleted inodes),
# a big file's MiB about 1 ms; on a fresh file system a file takes about 0.05 ms.
FILE_COST_BYTES = 256 << 10
DIRECT_MIN = BUFFER_SIZE  # smaller files go through the page cache: one padded direct write overlaps nothing
READ_PIECE = 1 << 20


@dataclass
class RestoreRequest:
    backup: str
    target_dir: str
    target: RecoveryTarget
    timeline: str = "latest"
    action: str = "promote"
    start: bool = False
    force: bool = False
    delta: bool = False
    port: int | None = None
    jobs: int = 2
    config_file: str | None = None
    start_timeout: float = START_TIMEOUT
    archive_mode: str = "preserve"  # "off": the restored copy does not archive into the repository (a test copy)


@dataclass
class PhysicalRestoreReport:
    backup_id: str
    target_dir: str
    target: str
    settings: dict[str, str]
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    tablespaces: list[dict[str, str]] = field(default_factory=list)
    started: bool = False
    port: int | None = None
    socket_dir: str | None = None
    reached: dict[str, Any] = field(default_factory=dict)
    log_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"backup": self.backup_id, "target_dir": self.target_dir, "target": self.target, "recovery_settings": self.settings,
                "files": self.files, "bytes": self.bytes, "unchanged_files": self.skipped, "tablespaces": self.tablespaces,
                "started": self.started, "port": self.port, "socket_dir": self.socket_dir, "reached": self.reached,
                "log_file": self.log_file}


# --- choosing the backup ----------------------------------------------------------------------
def as_physical(m: Manifest) -> PhysicalBackup | None:
    p = m.physical
    if m.type not in ("full", "diff", "incr") or not p.get("start_lsn"):
        return None
    return PhysicalBackup(m.id, m.type, m.started_at, m.finished_at, Lsn.parse(p["start_lsn"]), Lsn.parse(p["stop_lsn"]),
                          int(p["timeline"]), m.checksum_ok)


def read_history(repo: Repository, tli: int) -> str | None:
    try:
        return b"".join(repo.read_object(layout.wal_key(history_file_name(tli)))).decode()
    except NotFound:
        return None


def newest_timeline(repo: Repository) -> int | None:
    """The newest timeline with a history file in the archive (probing 2, 3, ... as PostgreSQL does); None: only 1."""
    tli = 1
    while True:
        try:
            repo.storage.stat(layout.wal_key(history_file_name(tli + 1)))
        except NotFound:
            return tli if tli > 1 else None
        tli += 1


def choose(repo: Repository, req: RestoreRequest) -> Manifest:
    target_tli = int(req.timeline) if req.timeline.isdigit() else newest_timeline(repo) if req.timeline == "latest" else None
    if req.backup != "latest":
        m = repo.load_manifest(req.backup)
        if m.type not in ("full", "diff", "incr"):
            raise ConfigError(f"backup {m.id} is a {m.type} backup; --target-dir restores physical backups",
                              hint="use --target-db for logical backups")
        if not m.checksum_ok:
            raise IntegrityError(f"the manifest of backup {m.id} is damaged (checksum mismatch)")
        _check_chain(repo, m, {})
        if req.target.kind == "time" and req.target.time is not None and m.finished_at >= req.target.time:
            raise ConfigError(f"backup {m.id} finished at {m.finished}, after the target {req.target.describe()}",
                              hint="choose an older backup, or 'latest' to pick one")
        if req.target.kind == "lsn" and req.target.lsn is not None and Lsn.parse(m.physical["stop_lsn"]) > req.target.lsn:
            raise ConfigError(f"backup {m.id} ends at {m.physical['stop_lsn']}, after the target {req.target.describe()}")
        return m
    every = {m.id: m for m in repo.manifests()}
    manifests = {}
    for m in every.values():
        if m.type not in ("full", "diff", "incr"):
            continue
        try:
            _check_chain(repo, m, every)
        except (BackupNotFound, IntegrityError) as exc:
            log.warning("skipping backup %s: %s", m.id, exc)
            continue
        manifests[m.id] = m
    candidates = [b for b in (as_physical(m) for m in manifests.values()) if b is not None]
    history = []
    if target_tli is not None and target_tli > 1:
        text = read_history(repo, target_tli)
        if text is None:
            raise ConfigError(f"timeline {target_tli} has no history file in the repository")
        history = parse_history(text)
    try:
        chosen = choose_backup(candidates, req.target, target_tli, history)
    except ValueError as exc:
        raise BackupNotFound(str(exc)) from None
    return manifests[chosen.id]


def _check_chain(repo: Repository, m: Manifest, known: dict[str, Manifest]) -> list[Manifest]:
    """A diff/incr is restorable only with every backup it depends on, each with a good manifest."""
    if m.type == "full":
        return [m]
    cache = dict(known)
    members = incremental.chain_of(repo, m, cache)
    bad = [b.id for b in members if not b.checksum_ok]
    if bad:
        raise IntegrityError(f"backup {bad[0]} in the chain of {m.id} is damaged (manifest checksum mismatch)")
    return members


# --- target directory -------------------------------------------------------------------------
def _running_pid(target: Path) -> int | None:
    try:
        pid = int((target / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _clear(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prepare_target(target: Path, force: bool, delta: bool) -> None:
    if target.exists() and not target.is_dir():
        raise RestoreRefused(f"target {target} exists and is not a directory")
    if target.exists() and any(target.iterdir()):
        pid = _running_pid(target)
        if pid:
            raise RestoreRefused(f"a PostgreSQL server (pid {pid}) is running on {target}", hint="stop it first")
        if not (force or delta):
            raise RestoreRefused(f"target directory {target} is not empty",
                                 hint="pass --force to replace its contents, or --delta to rewrite only what differs")
        if not delta:
            _clear(target)
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)


def tablespace_locations(physical: dict[str, Any], target: Path, force: bool) -> dict[str, str]:
    """oid -> directory for each tablespace: the original location if free, else ``<target>.tblspc/<oid>``."""
    out = {}
    for ts in physical.get("tablespaces", []):
        oid, original = ts["oid"], ts["location"]
        loc = Path(original)
        if loc.exists() and any(loc.iterdir()):
            loc = Path(f"{target}.tblspc") / oid
            if loc.exists() and any(loc.iterdir()):
                if not force:
                    raise RestoreRefused(f"tablespace directory {loc} is not empty", hint="pass --force to replace its contents")
                _clear(loc)
            log.warning("tablespace %s: %s is in use; restoring it to %s", oid, original, loc)
        loc.mkdir(parents=True, exist_ok=True)
        loc.chmod(0o700)
        out[oid] = str(loc)
    return out


# --- files --------------------------------------------------------------------------------------
class Writer:
    def __init__(self, repo: Repository, manifest: Manifest, target: Path, spaces: dict[str, str], delta: bool) -> None:
        self.repo = repo
        self.manifest = manifest
        self.target = target
        self.spaces = spaces
        self.delta = delta
        self.ts_dir = str(manifest.physical.get("tablespace_dir", ""))
        self.skipped = 0
        self.lock = threading.Lock()
        self.open_lock = threading.Lock()
        self.direct = DirectFiles()  # files of DIRECT_MIN and more skip the page cache (pipeline/direct_io.py)
        # Files of packs are created by a helper thread beside the big files (pipeline/small_files.py); a delta
        # restore writes them itself (it compares files in place, and may rewrite one through a link it finds).
        self.small = None if delta else SmallFiles()

    def dest(self, path: str) -> Path:
        parts = path.split("/")
        if parts[0] == "pg_tblspc" and len(parts) > 2 and parts[1] in self.spaces:
            return Path(self.spaces[parts[1]], *parts[2:])
        if ".." in parts or path.startswith("/"):
            raise IntegrityError(f"backup {self.manifest.id} names an unsafe path {path!r}")
        return self.target / path

    def _unchanged(self, dest: Path, entry: dict[str, Any]) -> bool:
        if not self.delta:
            return False
        return incremental.file_matches(str(dest), entry)

    def _write(self, entry: dict[str, Any], chunks: Iterable[bytes | memoryview]) -> None:
        dest = self.dest(entry["path"])
        h = digests.like(digests.recorded(entry))
        size = 0
        with open(dest, "wb") as out:
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
            self._finish(out, entry, size, h)

    def _write_object(self, entry: dict[str, Any], key: str) -> None:
        """A file stored alone in its object: written directly from the decompressor's buffers when big
        enough and the file system allows it (``pipeline/direct_io.py``), else through ``_write``.  The
        object is opened (its header read, its key unwrapped) before the file is created."""
        if int(entry["size"]) < DIRECT_MIN or not self.direct.supported:
            self._write(entry, self.repo.read_object(key))
            return
        h = digests.like(digests.recorded(entry))
        with self.repo.object_reader(key) as plain:
            fd = self.direct.open(str(self.dest(entry["path"])))
            if fd is None:  # refused: through the page cache
                self._write(entry, iter(partial(plain.read, READ_PIECE), b""))
                return
            with open(fd, "wb") as out:
                self._finish(out, entry, self.direct.write(fd, plain.readinto, h.update), h)

    def _verify(self, entry: dict[str, Any], size: int, h: digests.Hasher) -> None:
        if size != entry["size"] or not digests.matches(h, digests.recorded(entry)):
            raise IntegrityError(f"backup {self.manifest.id}: restored {entry['path']} differs from the manifest "
                                 f"({size} bytes, expected {entry['size']})")

    def _finish(self, out: BinaryIO, entry: dict[str, Any], size: int, h: digests.Hasher) -> None:
        """Check a written file against the manifest, then set its mode and times."""
        self._verify(entry, size, h)
        out.flush()  # before the times are set; by descriptor: no second and third path lookup
        os.fchmod(out.fileno(), entry.get("mode", 0o600) & 0o777)
        if entry.get("mtime"):
            os.utime(out.fileno(), (entry["mtime"], entry["mtime"]))

    def restore_object(self, name: str, entries: list[dict[str, Any]], backup: str | None = None) -> int:
        key = layout.object_key(backup or self.manifest.id, name)
        todo = [e for e in entries if not self._unchanged(self.dest(e["path"]), e)]
        with self.lock:
            self.skipped += len(entries) - len(todo)
        if not todo:
            return 0
        if _own_object(name, entries):
            self._write_object(entries[0], key)
            return int(entries[0]["size"])
        pack = memoryview(b"".join(self.repo.read_object(key)))
        for e in todo:
            piece = pack[e["offset"] : e["offset"] + e["size"]]
            if self.small is None:
                self._write(e, [piece])
                continue
            h = digests.like(digests.recorded(e))
            h.update(piece)
            self._verify(e, len(piece), h)
            self.small.submit(str(self.dest(e["path"])), piece, e.get("mode", 0o600) & 0o777, e.get("mtime") or None, e["path"])
        return sum(int(e["size"]) for e in todo)

    def restore_empty(self, entry: dict[str, Any]) -> None:
        """An empty file of a diff/incr: no object holds it."""
        if self._unchanged(self.dest(entry["path"]), entry):
            with self.lock:
                self.skipped += 1
            return
        self._write(entry, [])

    def restore_merged(self, cache: incremental.PackCache, entry: dict[str, Any]) -> int:
        """A file of a diff/incr chain: base and block deltas merged in one pass."""
        dest = self.dest(entry["path"])
        if self.delta and incremental.file_matches(str(dest), entry):
            with self.lock:
                self.skipped += 1
            return 0
        return incremental.restore_merged(self.repo, cache, entry, str(dest), self.open_lock)

    def restore_wal(self, name: str) -> None:
        seg = name.split("/", 1)[1]
        dest = self.target / "pg_wal" / seg
        with open(dest, "wb") as out:
            for chunk in self.repo.read_object(layout.object_key(self.manifest.id, name)):
                out.write(chunk)
        os.chmod(dest, 0o600)


def restore_files(repo: Repository, manifest: Manifest, target: Path, spaces: dict[str, str], delta: bool, jobs: int,
                  report: PhysicalRestoreReport) -> None:
    p = manifest.physical
    writer = Writer(repo, manifest, target, spaces, delta)
    for d in sorted(p.get("dirs", []), key=lambda d: d["path"]):
        if d.get("tablespace"):
            link = target / d["path"]
            if link.is_symlink() or link.exists():
                link.unlink()
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(spaces[d["tablespace"]], link)
            continue
        dest = writer.dest(d["path"])
        dest.mkdir(parents=True, exist_ok=True)
        dest.chmod(int(d.get("mode", 0o700)) & 0o777 or 0o700)
    for ln in p.get("links", []):
        dest = writer.dest(ln["path"])
        if not dest.is_symlink():
            os.symlink(ln["target"], dest)
    by_object: dict[tuple[str, str], list[dict[str, Any]]] = {}
    merged: list[dict[str, Any]] = []
    empty: list[dict[str, Any]] = []
    for f in p.get("files", []):
        if f.get("kind", "full") == "incremental":
            merged.append(f)
        elif "object" not in f and int(f["size"]) == 0:  # an empty file of a diff/incr stores no bytes, so no object
            empty.append(f)
        else:
            by_object.setdefault((f.get("backup") or manifest.id, f["object"]), []).append(f)
    merged.sort(key=lambda f: (f["base"]["backup"], f["base"]["object"], int(f["base"].get("offset", 0))))
    cache = incremental.PackCache(repo)
    if delta:
        _remove_extra(target, {f["path"] for f in p.get("files", [])}, {d["path"] for d in p.get("dirs", [])})
    wal = [o.name for o in manifest.objects if o.name.startswith("wal/")]
    (target / "pg_wal").mkdir(exist_ok=True)
    for f in empty:
        writer.restore_empty(f)
    schedule = _Schedule(list(by_object.items()), writer.small.room_for if writer.small else None)

    def objects() -> int:
        done = 0
        try:
            while (item := schedule.next()) is not None:
                done += writer.restore_object(item[0][1], item[1], item[0][0])
        except BaseException:
            schedule.stop()
            raise
        return done

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="restore") as pool:
            try:
                sizes = [f.result() for f in [pool.submit(objects) for _ in range(max(1, jobs))]]
            except BaseException:  # an interrupt: the threads take nothing more
                schedule.stop()
                raise
            sizes += list(pool.map(lambda f: writer.restore_merged(cache, f), merged))
            list(pool.map(writer.restore_wal, wal))
    finally:
        writer.direct.close()
        if writer.small:
            writer.small.close()
    if writer.small:
        writer.small.check()
    report.files = sum(len(v) for v in by_object.values()) + len(merged) + len(empty)
    report.bytes = sum(sizes)
    report.skipped = writer.skipped


ObjectItem = tuple[tuple[str, str], list[dict[str, Any]]]  # ((backup, object name), its files to restore)


def _own_object(name: str, entries: list[dict[str, Any]]) -> bool:
    """An object holding one whole file (written from the object's stream), not a pack of several."""
    return len(entries) == 1 and entries[0]["offset"] == 0 and (name.startswith("f") or bool(entries[0].get("own")))


class _Schedule:
    """Which object a restoring thread takes next.  With a small-file helper (``room``: whether it can queue
    that many bytes now), a pack while the helper has room for it, so that its files are created while
    the big files are written, else the costliest file of its own, else a pack (waiting for room).
    Without one, costliest first.  After ``stop`` (a thread failed) nothing more."""

    def __init__(self, items: list[ObjectItem], room: Callable[[int], bool] | None) -> None:
        ordered = sorted(items, key=_costliest_first)
        self.room = room
        self.packs = [] if room is None else [i for i in ordered if not _own_object(i[0][1], i[1])]
        self.others = [i for i in ordered if room is None or _own_object(i[0][1], i[1])]
        self.lock = threading.Lock()

    def next(self) -> ObjectItem | None:
        with self.lock:
            if self.packs and (not self.others or (self.room and self.room(sum(int(e["size"]) for e in self.packs[0][1])))):
                return self.packs.pop(0)
            return self.others.pop(0) if self.others else None

    def stop(self) -> None:
        with self.lock:
            self.packs, self.others = [], []


def _costliest_first(item: ObjectItem) -> tuple[int, str, str]:
    """Objects by estimated cost, costliest first, then by name: the longest tasks start first, so no
    thread is left working alone at the end.  A file costs its bytes plus ``FILE_COST_BYTES``."""
    (backup, name), entries = item
    return -sum(int(e["size"]) + FILE_COST_BYTES for e in entries), backup, name


def _remove_extra(target: Path, files: set[str], dirs: set[str]) -> None:
    """--delta: remove what the backup does not hold (outside pg_wal, which recovery manages)."""
    for root, dnames, fnames in os.walk(target, topdown=True):
        rel = os.path.relpath(root, target)
        rel = "" if rel == "." else rel
        if rel.split("/")[0] in ("pg_wal", "pg_tblspc"):
            dnames[:] = []
            continue
        for name in fnames:
            path = f"{rel}/{name}" if rel else name
            if path not in files:
                os.unlink(os.path.join(root, name))
        for name in list(dnames):
            path = f"{rel}/{name}" if rel else name
            if path not in dirs and not (not rel and name in ("pg_wal", "pg_tblspc")):
                shutil.rmtree(os.path.join(root, name))
                dnames.remove(name)


def archive_chunks(repo: Repository, manifest: Manifest) -> Iterable[bytes]:
    """A remote-mode backup's tar as it streams (decompressed when the server compressed it)."""
    from saveit_backup.pipeline.compress import decompress_stream

    archive = manifest.physical["archive"]
    chunks: Iterable[bytes] = repo.read_object(layout.object_key(manifest.id, archive["object"]))
    if archive.get("content") == "tar.zst":
        chunks = decompress_stream(chunks, "zstd")
    return chunks


def extract_archive(repo: Repository, manifest: Manifest, target: Path) -> None:
    """A remote-mode backup's tar, extracted into ``target`` as it streams (``pipeline/untar.py``): the server's
    zstd stream decompressed straight into the direct-write buffers, the repository read ahead in a thread.
    The archive object's bytes are checked against the manifest's size and digest at the end."""
    from saveit_backup.pipeline.compress import decompress_reader

    archive = manifest.physical["archive"]
    entry = next((o for o in manifest.objects if o.name == archive["object"]), None)
    if entry is None:
        raise IntegrityError(f"backup {manifest.id}: the manifest lists no object {archive['object']!r} (manifest damaged)")
    h = digests.like(entry.digest)
    seen = 0

    def observed(chunks: Iterable[bytes]) -> Iterator[bytes]:
        nonlocal seen
        for chunk in chunks:
            h.update(chunk)
            seen += len(chunk)
            yield chunk

    source = read_ahead(observed(repo.read_object(layout.object_key(manifest.id, archive["object"]))), depth=8)
    direct = DirectFiles()
    try:
        raw = decompress_reader(source, "zstd") if archive.get("content") == "tar.zst" else ChunkReader(source)
        with raw:
            untar.extract(raw, str(target), f"backup {manifest.id}", direct)  # reads the archive to its end
    finally:
        direct.close()
    if seen != entry.size or not digests.matches(h, entry.digest):
        raise IntegrityError(f"backup {manifest.id}: the archive object {archive['object']} differs from the manifest "
                             f"({seen} bytes, expected {entry.size})")


def restore_tar(repo: Repository, manifest: Manifest, target: Path, report: PhysicalRestoreReport) -> None:
    """Remote-mode backups: a full one extracted as it streams; a diff/incr chain rebuilt in one pass over its
    tars (``ops/native_combine.py``)."""
    if manifest.type == "full":
        extract_archive(repo, manifest, target)
    else:
        native_combine.combine(_check_chain(repo, manifest, {}), target,
                               lambda m: io.BufferedReader(ChunkReader(read_ahead(archive_chunks(repo, m), depth=8)), 1 << 20))
    files, size = _private_tree(target)
    (target / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    writer = Writer(repo, manifest, target, {}, False)
    for o in manifest.objects:
        if o.name.startswith("wal/"):
            writer.restore_wal(o.name)
    report.files, report.bytes = files, size


def _private_tree(target: Path) -> tuple[int, int]:
    """Directories 0700, files 0600 (as PostgreSQL wants them); returns (files, bytes)."""
    files = size = 0
    for dirpath, _dirnames, filenames in os.walk(target):
        os.chmod(dirpath, 0o700)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)
                files += 1
                size += os.path.getsize(path)
    return files, size


# --- recovery configuration ----------------------------------------------------------------------
def restore_command(repo_url: str, config_file: str | None) -> str:
    """``<this program> wal-fetch --repo URL [--config FILE] %f %p`` (the wal-fetch fast path)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "saveit-backup" and os.path.exists(argv0):
        prog = shlex.quote(os.path.abspath(argv0))
    elif shutil.which("saveit-backup"):
        prog = shlex.quote(os.path.abspath(str(shutil.which("saveit-backup"))))
    else:
        prog = f"{shlex.quote(sys.executable)} -m saveit_backup"
    # --abort-on-error: a storage outage stops recovery loudly instead of ending it early as "not found".
    cmd = f"{prog} wal-fetch --abort-on-error --repo {shlex.quote(repo_url)}"
    if config_file:
        cmd += f" --config {shlex.quote(os.path.abspath(config_file))}"
    return cmd + " %f %p"


def write_recovery(target: Path, settings: dict[str, str], manifest: Manifest) -> None:
    auto = target / "postgresql.auto.conf"
    lines = auto.read_text().splitlines(keepends=True) if auto.exists() else []
    replaced = set(RECOVERY_KEYS) | set(settings)
    kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in replaced]
    kept.append(f"# saveit-backup: recovery from backup {manifest.id}\n")
    kept += [f"{k} = {v}\n" for k, v in settings.items()]
    auto.write_text("".join(kept))
    auto.chmod(0o600)
    (target / "recovery.signal").write_text("")
    (target / "recovery.signal").chmod(0o600)
    standby = target / "standby.signal"
    if standby.exists():
        standby.unlink()


# --- start and watch ------------------------------------------------------------------------------
def _log_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if any(m in ln for m in LOG_MARKERS)][-12:]


def _controldata(bindir: str, target: Path) -> dict[str, str]:
    out = subprocess.run([str(Path(bindir) / "pg_controldata"), "-D", str(target)], capture_output=True, text=True, check=False)
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.stdout.splitlines()) if v}


def start_and_watch(target: Path, bindir: str, port: int | None, action: str, timeout: float, report: PhysicalRestoreReport) -> None:
    """Start the restored server with ``bindir``'s pg_ctl and wait until recovery reached its end."""
    import psycopg

    port = port or free_port()
    sock = str(target)
    if len(sock) + 20 > 100:  # unix socket paths are limited to ~107 bytes
        import tempfile

        sock = tempfile.mkdtemp(prefix="saveit-sock-")
    log_file = Path(f"{str(target).rstrip('/')}.log")
    target.chmod(0o700)
    opts = f"-p {port} -k {shlex.quote(sock)} -c logging_collector=off"
    proc = subprocess.run([str(Path(bindir) / "pg_ctl"), "-D", str(target), "-l", str(log_file), "-W", "-o", opts, "start"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PgToolError(f"pg_ctl start failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    report.started, report.port, report.socket_dir, report.log_file = True, port, sock, str(log_file)
    began = time.monotonic()
    seen_pid = False
    while time.monotonic() < began + timeout:
        time.sleep(0.3)
        running = (target / "postmaster.pid").exists()
        seen_pid = seen_pid or running
        if not running and (seen_pid or time.monotonic() > began + 10):
            facts = _controldata(bindir, target)
            state = facts.get("Database cluster state", "")
            if action == "shutdown" and "recovery" in state:
                report.reached = {"state": "shut down at the target", "cluster_state": state,
                                  "timeline": int(facts.get("Latest checkpoint's TimeLineID", "0") or 0),
                                  "min_recovery_lsn": facts.get("Minimum recovery ending location"), "log": _log_lines(log_file)}
                return
            lines = _log_lines(log_file)
            raise PgToolError(f"the restored server stopped during recovery: {lines[-1] if lines else 'see ' + str(log_file)}",
                              hint=f"read {log_file}; a target after the end of the archived WAL stops recovery")
        if not running:
            continue
        try:
            with psycopg.connect(host=sock, port=port, dbname="postgres", connect_timeout=3, autocommit=True) as conn:
                in_recovery = bool(conn.execute("SELECT pg_is_in_recovery()").fetchone()[0])  # type: ignore[index]
                paused = False
                if in_recovery:
                    row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
                    paused = bool(row and row[0] == "paused")
                if (action == "promote" and not in_recovery) or (action == "pause" and (paused or not in_recovery)):
                    report.reached = _reached(conn, in_recovery, paused) | {"log": _log_lines(log_file)}
                    return
        except psycopg.OperationalError:
            continue  # starting up, or recovering before consistency
    raise PgToolError(f"recovery did not finish within {timeout:.0f} s", hint=f"the server is still running; read {log_file}")


def _reached(conn: Any, in_recovery: bool, paused: bool) -> dict[str, Any]:
    row = conn.execute("SELECT pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn()::text,"
                       " (SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
    tli = int(row[2])
    if not in_recovery:
        current = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
        tli = int(str(current[0])[:8], 16)
    last = row[0]
    return {"state": "paused at the target" if paused else "in recovery" if in_recovery else "promoted",
            "last_transaction_time": last.isoformat() if last is not None else None, "replay_lsn": row[1], "timeline": tli}


# --- the restore ----------------------------------------------------------------------------------
def restore_physical(ctx: Context, req: RestoreRequest, progress: Progress) -> PhysicalRestoreReport:
    repo = ctx.repo
    repo.load_config()
    manifest = choose(repo, req)
    p = manifest.physical
    target = Path(os.path.abspath(req.target_dir))
    if req.delta and p.get("mode") != "local":
        raise ConfigError("--delta needs a backup taken in local mode (per-file checksums)")
    prepare_target(target, req.force, req.delta)
    try:
        command = restore_command(ctx.settings.repository_url, req.config_file)
        settings = recovery_settings(req.target, command, req.timeline, req.action)  # type: ignore[arg-type]
        if req.archive_mode == "off":
            settings["archive_mode"] = "'off'"
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    report = PhysicalRestoreReport(manifest.id, str(target), req.target.describe(), settings)
    log.info("restoring backup %s (%s mode, %s) into %s", manifest.id, p.get("mode"), manifest.finished, target)
    major = manifest.pg_version // 10000
    if p.get("mode") == "remote":
        restore_tar(repo, manifest, target, report)
    else:
        spaces = tablespace_locations(p, target, req.force)
        report.tablespaces = [{"oid": oid, "location": loc} for oid, loc in spaces.items()]
        restore_files(repo, manifest, target, spaces, req.delta, req.jobs, report)
        (target / "backup_label").write_text(p["backup_label"])
        (target / "backup_label").chmod(0o600)
        if p.get("tablespace_map"):
            lines = []
            for ts in p.get("tablespaces", []):
                lines.append(f"{ts['oid']} {spaces[ts['oid']]}\n")
            (target / "tablespace_map").write_text("".join(lines))
    write_recovery(target, settings, manifest)
    if req.start:
        pg_ctl = find_tool("pg_ctl", ctx.settings.pg_bindir, major, exact=True)
        start_and_watch(target, os.path.dirname(pg_ctl), req.port, req.action, req.start_timeout, report)
    return report
