"""Full physical backups: local (read PGDATA between pg_backup_start/stop) or remote (pg_basebackup).

Local mode (``--pgdata``): one connection stays open for the whole backup (non-exclusive backup);
files are read by ``jobs`` worker threads and stored through the pipeline.  Files of at least
``BIG_FILE`` bytes become one object each; smaller files are bundled into pack objects of about
``PACK_TARGET`` bytes (the manifest records object, offset and length per file) so that object
stores see few PUTs.  Relation files are checked against their page checksums as they pass when the
cluster has data checksums (``pg/pagecheck.py``); bad pages are recorded as warnings in the manifest.

Remote mode (``--remote``): ``pg_basebackup -D - -Ft -X fetch`` over the replication protocol,
streamed into one object; nothing touches local disk (``-X none`` for clusters over
``FETCH_WAL_MAX_BYTES``, or when the server recycled a segment before sending it).  Where the server can take incremental base
backups (17+, ``summarize_wal = on``), the tar is streamed as it is (compressed by our pipeline) and
the ``backup_manifest`` pg_basebackup appends to it is also kept as an object of its own, for later
incrementals: pg_basebackup cannot add its manifest to a server-compressed tar on stdout.  Elsewhere
the server compresses (``server-zstd``) when it can, without a manifest, and the object is stored with
codec ``none`` (already compressed); the manifest says ``content: tar.zst``.

Both modes wait until the WAL from the start to the stop segment is archived in the repository and
copy it into the backup (``wal/<segment>`` objects), so a full backup stays restorable after WAL
retention removed its segments.  The repository lock is held throughout; the manifest is written last.

``--type diff``/``incr`` store block deltas against a reference backup in local mode
(``ops/incremental.py``) and run ``pg_basebackup --incremental`` in remote mode
(``ops/native_incremental.py``); without a usable reference they take a full backup and record why in
``options.fallback``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from saveit_backup import __version__
from saveit_backup.compose import Context
from saveit_backup.domain.manifest import Manifest, ObjectEntry, iso, utcnow
from saveit_backup.domain.timeline import parse_backup_label
from saveit_backup.domain.wal import Lsn, segment_range
from saveit_backup.errors import ConfigError, NotFound, PgToolError
from saveit_backup.ops import incremental, native_incremental
from saveit_backup.ops.progress import Progress
from saveit_backup.pg import pagecheck
from saveit_backup.pg.conn import ServerFacts, connect, find_tool, server_facts, split_password, tool_env
from saveit_backup.pipeline import digests
from saveit_backup.pipeline.envelope import Digest, EncodeOptions
from saveit_backup.pipeline.tartap import TarMemberTap
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository

log = logging.getLogger(__name__)

READ_SIZE = 4 << 20  # bigger reads: fewer Python-level steps per byte (checksums, hashing, zstd)
BIG_FILE = 1 << 20  # files at least this big are objects of their own
PACK_TARGET = 16 << 20  # small files are bundled into packs of about this size
REFERENCE_CACHE = 64 << 20  # diff/incr with page XOR: decoded reference packs kept in memory
WAL_TIMEOUT = 300.0  # seconds to wait for the backup's WAL to reach the repository
MAX_BAD_PAGES = 1000  # recorded per backup; the count goes on

# What PostgreSQL's own base backup leaves out (src/backend/backup/basebackup.c), plus leftovers of
# earlier restores.  Directories: the contents are skipped, the directory itself is kept.
EXCLUDE_DIR_CONTENTS = frozenset({"pg_wal", "pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial",
                                  "pg_snapshots", "pg_subtrans"})
EXCLUDE_FILES = frozenset({"postmaster.pid", "postmaster.opts", "postgresql.auto.conf.tmp", "current_logfiles.tmp",
                           "backup_label", "backup_label.old", "tablespace_map", "tablespace_map.old", "backup_manifest",
                           "recovery.signal", "standby.signal", "recovery.done"})


@dataclass
class PhysicalOptions:
    mode: str  # "local" | "remote"
    pgdata: str = ""
    jobs: int = 2
    verify_checksums: bool = True
    wal_timeout: float = WAL_TIMEOUT
    server_compression: bool = True
    kind: str = "full"  # "full" | "diff" | "incr" (block-level, ops/incremental.py)
    page_xor: bool = False  # diff/incr: changed pages stored as XOR with the reference's page (reads the reference)


@dataclass
class FileEntry:
    path: str
    size: int
    mode: int
    mtime: float
    digest: str = ""  # of the file as read, "<algorithm>:<hex>"
    object: str = ""
    offset: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mode": self.mode, "mtime": int(self.mtime), "digest": self.digest,
                "object": self.object, "offset": self.offset}


@dataclass
class Scan:
    files: list[FileEntry] = field(default_factory=list)
    dirs: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    tablespaces: list[dict[str, str]] = field(default_factory=list)


@dataclass
class ChecksumReport:
    enabled: bool
    pages: int = 0
    bad: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, pages: int, path: str, bad: list[pagecheck.BadPage]) -> None:
        with self.lock:
            self.pages += pages
            for b in bad:
                self.bad += 1
                if len(self.failures) < MAX_BAD_PAGES:
                    self.failures.append({"file": path, "block": b.block, "expected": b.expected, "found": b.found})

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "pages_checked": self.pages, "bad_pages": self.bad, "failures": self.failures}


def _entry(name: str, digest: Digest) -> ObjectEntry:
    return ObjectEntry(name, digest.plain_size, digest.stored_size, digest.plain_digest, digest.codec, digest.cipher)


# --- scanning PGDATA --------------------------------------------------------------------------
def _unlogged_nodes(names: list[str]) -> set[str]:
    """Relfilenodes with an ``_init`` fork: unlogged relations, whose other forks are not backed up."""
    return {n[: -len("_init")] for n in names if n.endswith("_init") and n[: -len("_init")].isdigit()}


def _skip_unlogged(name: str, unlogged: set[str]) -> bool:
    base = name.split(".", 1)[0].split("_", 1)[0]
    return base in unlogged and not name.split(".", 1)[0].endswith("_init")


def scan(pgdata: str, tablespace_dir: str) -> Scan:
    """Every file to copy, with the exclusions of PostgreSQL's base backup; tablespaces followed."""
    out = Scan()

    def walk(real: str, rel: str, in_tablespace: bool) -> None:
        try:
            entries = sorted(os.scandir(real), key=lambda e: e.name)
        except FileNotFoundError:
            return  # dropped meanwhile
        names = [e.name for e in entries]
        unlogged = _unlogged_nodes(names) if rel.startswith(("base/", "pg_tblspc/")) else set()
        for e in entries:
            path = f"{rel}/{e.name}" if rel else e.name
            if e.name.startswith("pgsql_tmp") or e.name == "pg_internal.init" or e.name.endswith(".tmp-saveit"):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(e.path)
                if rel == "pg_tblspc":
                    out.tablespaces.append({"oid": e.name, "location": target})
                    out.dirs.append({"path": path, "mode": 0o700, "tablespace": e.name})
                    walk(os.path.join(target, tablespace_dir), f"{path}/{tablespace_dir}", True)
                    continue
                if not rel and e.name in EXCLUDE_DIR_CONTENTS:  # e.g. pg_wal on another disk: an empty dir
                    out.dirs.append({"path": path, "mode": 0o700})
                    if e.name == "pg_wal":
                        out.dirs.append({"path": "pg_wal/archive_status", "mode": 0o700})
                    continue
                out.links.append({"path": path, "target": target})
                continue
            if stat.S_ISDIR(st.st_mode):
                out.dirs.append({"path": path, "mode": stat.S_IMODE(st.st_mode)})
                if not rel and e.name in EXCLUDE_DIR_CONTENTS:
                    if e.name == "pg_wal":
                        out.dirs.append({"path": "pg_wal/archive_status", "mode": stat.S_IMODE(st.st_mode)})
                    continue
                walk(e.path, path, in_tablespace)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if not rel and e.name in EXCLUDE_FILES:
                continue
            if unlogged and _skip_unlogged(e.name, unlogged):
                continue
            out.files.append(FileEntry(path, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime))

    walk(pgdata, "", False)
    if tablespace_dir:
        for ts in out.tablespaces:
            out.dirs.append({"path": f"pg_tblspc/{ts['oid']}/{tablespace_dir}", "mode": 0o700})
    return out


def plan_objects(files: list[FileEntry]) -> list[tuple[str, list[FileEntry]]]:
    """(object name, files): big files alone, small files bundled into packs; biggest work first."""
    big = sorted((f for f in files if f.size >= BIG_FILE), key=lambda f: -f.size)
    small = sorted((f for f in files if f.size < BIG_FILE), key=lambda f: f.path)
    plan: list[tuple[str, list[FileEntry]]] = [(f"f{n:06d}", [f]) for n, f in enumerate(big, 1)]
    pack: list[FileEntry] = []
    size = 0
    count = 0
    for f in small:
        pack.append(f)
        size += f.size
        if size >= PACK_TARGET:
            count += 1
            plan.append((f"p{count:06d}", pack))
            pack, size = [], 0
    if pack:
        count += 1
        plan.append((f"p{count:06d}", pack))
    return plan


# --- reading files ----------------------------------------------------------------------------
class FileReader:
    """Reads a file for the backup: hashes it, sizes it and checks its pages as the bytes pass."""

    def __init__(self, pgdata: str, tablespaces: dict[str, str], checks: ChecksumReport, start_lsn: int) -> None:
        self.pgdata = pgdata
        self.tablespaces = tablespaces
        self.checks = checks
        self.start_lsn = start_lsn

    def real_path(self, path: str) -> str:
        """Where ``path`` (as in the manifest) is on disk; ``tablespaces`` maps oid -> the tablespace's location."""
        parts = path.split("/")
        if parts[0] == "pg_tblspc" and len(parts) > 2 and parts[1] in self.tablespaces:
            return os.path.join(self.tablespaces[parts[1]], *parts[2:])
        return os.path.join(self.pgdata, path)

    def chunks(self, entry: FileEntry) -> Iterator[bytes]:
        """The file's bytes; a file dropped meanwhile yields nothing (WAL replay knows it is gone)."""
        real = self.real_path(entry.path)
        segno = pagecheck.relation_segment(entry.path) if self.checks.enabled else None
        h = digests.new()
        size = 0
        try:
            fd = os.open(real, os.O_RDONLY)
        except FileNotFoundError:
            log.info("%s vanished during the backup (dropped); WAL replay accounts for it", entry.path)
            entry.size, entry.digest = 0, digests.tagged(h)
            return
        try:
            while True:
                chunk = os.pread(fd, READ_SIZE, size)
                if not chunk:
                    break
                if segno is not None:
                    self._check(fd, entry.path, chunk, segno * pagecheck.RELSEG_SIZE + size // pagecheck.BLCKSZ, size)
                h.update(chunk)
                size += len(chunk)
                yield chunk
        finally:
            os.close(fd)
        entry.size, entry.digest = size, digests.tagged(h)

    def _check(self, fd: int, path: str, chunk: bytes, first_blkno: int, offset: int) -> None:
        pages, bad = pagecheck.check_chunk(chunk, first_blkno, self.start_lsn)
        confirmed = []
        for b in bad:  # re-read once: the first read may have raced a write of the page (torn read)
            block_off = offset + (b.block - first_blkno) * pagecheck.BLCKSZ
            again = os.pread(fd, pagecheck.BLCKSZ, block_off)
            _, still = pagecheck.check_chunk(again, b.block, self.start_lsn)
            confirmed += still
        if confirmed:
            log.warning("%s: %d page(s) with a bad checksum (blocks %s)", path, len(confirmed),
                        ", ".join(str(b.block) for b in confirmed[:10]))
        self.checks.add(pages, path, confirmed)


def _store_object(repo: Repository, bid: str, name: str, files: list[FileEntry], reader: FileReader,
                  options: EncodeOptions) -> ObjectEntry:
    key = layout.object_key(bid, name)
    if len(files) == 1 and files[0].size >= BIG_FILE:
        f = files[0]
        f.object, f.offset = name, 0
        # The object's plain bytes are the file's: FileReader's digest is the object's, hash once.
        digest = repo.put_object(key, reader.chunks(f), options._replace(hash=False))
        digest.plain_digest = f.digest
        return _entry(name, digest)

    def packed() -> Iterator[bytes]:
        offset = 0
        for f in files:
            f.object, f.offset = name, offset
            for chunk in reader.chunks(f):
                offset += len(chunk)
                yield chunk

    digest = repo.put_object(key, packed(), options)
    return _entry(name, digest)


# --- WAL ----------------------------------------------------------------------------------------
def wait_for_wal(repo: Repository, names: list[str], timeout: float) -> None:
    """Poll the repository until every name is archived (first look at once, then after 20 ms, growing to 2 s)."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    delay = 0.02
    while pending:
        still = []
        for name in pending:
            try:
                repo.storage.stat(layout.wal_key(name))
            except NotFound:
                still.append(name)
        pending = still
        if not pending:
            return
        if time.monotonic() > deadline:
            raise PgToolError(
                f"WAL {pending[0]} needed by the backup was not archived within {timeout:.0f} s ({len(pending)} missing)",
                hint="check archive_mode=on and archive_command = 'saveit-backup wal-push %p' (pg_stat_archiver shows failures)",
            )
        time.sleep(delay)
        delay = min(2.0, delay * 1.5)


def copy_wal(repo: Repository, bid: str, names: list[str], options: EncodeOptions, jobs: int) -> list[ObjectEntry]:
    """Copy archived segments into the backup (decoded and re-encoded: this also proves them readable)."""
    opts = options._replace(threads=0)

    def one(name: str) -> ObjectEntry:
        obj = f"wal/{name}"
        digest = repo.put_object(layout.object_key(bid, obj), repo.read_object(layout.wal_key(name)), opts)
        return _entry(obj, digest)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, names))


# --- the backup ---------------------------------------------------------------------------------
def _control_facts(conn: Any) -> dict[str, Any]:
    row = conn.execute("SELECT pg_control_version, catalog_version_no, system_identifier::text FROM pg_control_system()").fetchone()
    init = conn.execute("SELECT max_data_alignment, database_block_size, blocks_per_segment, wal_block_size,"
                        " bytes_per_wal_segment, data_page_checksum_version FROM pg_control_init()").fetchone()
    return {"pg_control_version": int(row[0]), "catalog_version_no": int(row[1]), "system_identifier": str(row[2]),
            "block_size": int(init[1]), "blocks_per_segment": int(init[2]), "wal_block_size": int(init[3]),
            "wal_segment_size": int(init[4]), "data_page_checksum_version": int(init[5])}


def _check_archiving(conn: Any) -> None:
    mode = str(conn.execute("SELECT current_setting('archive_mode')").fetchone()[0])
    if mode == "off":
        raise ConfigError(
            "physical backups need WAL archiving, but archive_mode is off",
            hint="set archive_mode = on and archive_command = 'saveit-backup wal-push %p' (restart needed)",
        )


def _pgdata_sysid(pgdata: str) -> str:
    try:
        with open(os.path.join(pgdata, "global", "pg_control"), "rb") as f:
            raw = f.read(8)
    except OSError as exc:
        raise ConfigError(f"{pgdata} is not a readable PostgreSQL data directory: {exc.strerror}",
                          hint="--pgdata / BACKUP_PGDATA must be the server's data directory, readable by this user") from None
    return str(int.from_bytes(raw, "little"))


def _new_manifest(ctx: Context, facts: ServerFacts, options: EncodeOptions, bid: str, started: str, mode: str,
                  kind: str = "full") -> Manifest:
    return Manifest(id=bid, type=kind, started=started, pg_version=facts.version_num,
                    system_identifier=facts.system_identifier, database="*", environment=ctx.settings.environment,
                    host=socket.gethostname(), tool_version=__version__,
                    encryption="aes-256-gcm" if options.encrypt else "none", options={"mode": mode})


def backup_physical(ctx: Context, opts: PhysicalOptions, progress: Progress) -> Manifest:
    repo = ctx.repo
    repo.ensure(auto_init=True)
    options = repo.write_options()
    conn = connect(ctx.settings.dbname)
    try:
        facts = server_facts(conn)
        _check_archiving(conn)
        control = _control_facts(conn)
        if opts.mode == "local":
            pgdata = os.path.realpath(opts.pgdata)
            sysid = _pgdata_sysid(pgdata)
            if sysid != facts.system_identifier:
                raise ConfigError(f"{opts.pgdata} belongs to another cluster (system identifier {sysid}, "
                                  f"the server's is {facts.system_identifier})",
                                  hint="point --pgdata at the connected server's data directory")
        with repo.lock(f"backup --type {opts.kind}"):
            kind, ref, fallback = opts.kind, None, ""
            if kind in ("diff", "incr"):
                row = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
                assert row is not None
                tli = int(row[0])
                if opts.mode == "remote":
                    ref, why = native_incremental.find_reference(repo, conn, facts, kind, tli)
                else:
                    ref, why = incremental.find_reference(repo, kind, facts.system_identifier, tli)
                if ref is None:
                    log.warning("backup --type %s: %s; taking a full backup instead", kind, why)
                    kind, fallback = "full", why
            bid, started = repo.new_backup_id(kind)
            manifest = _new_manifest(ctx, facts, options, bid, iso(started), opts.mode, kind)
            if fallback:
                manifest.options.update(fallback=fallback, requested=opts.kind)
            if ref is not None:
                manifest.parent = ref.manifest.id
            if opts.mode == "local":
                # Parallelism comes from the jobs workers, one single-threaded codec each: zstd worker threads on
                # top contended with the page checks for the GIL (scale 100 with checksums: 9.8 s -> 5.6 s, 129 -> 99 MB).
                physical = _local(repo, conn, facts, control, bid, pgdata, opts, options._replace(threads=0), ref)
            else:
                physical = _remote(ctx, repo, conn, facts, control, bid, opts, options, ref)
            if ref is not None:
                physical.update(reference=ref.manifest.id, reference_start_lsn=ref.manifest.physical["start_lsn"],
                                chain=[*ref.chain, bid],
                                incremental_method=native_incremental.METHOD if opts.mode == "remote" else "block-delta")
            objects: list[ObjectEntry] = physical.pop("_objects")
            segsize = control["wal_segment_size"]
            tli = int(physical["timeline"])
            start, stop = Lsn.parse(physical["start_lsn"]), Lsn.parse(physical["stop_lsn"])
            wal = segment_range(start, max(start, stop - 1), tli, segsize)
            wait_for_wal(repo, wal, opts.wal_timeout)
            objects += copy_wal(repo, bid, wal, options, opts.jobs)
            physical.update(start_wal=wal[0], stop_wal=wal[-1], wal=wal, wal_in_backup=True, pg_control=control,
                            data_checksums=facts.data_checksums, segment_size=segsize)
            manifest.objects = objects
            manifest.physical = physical
            manifest.finished = iso(utcnow())
            repo.commit(manifest)
            log.info("backup %s committed: %d objects, %d bytes stored", bid, len(objects), manifest.stored_bytes)
            return manifest
    finally:
        conn.close()


def _local(repo: Repository, conn: Any, facts: ServerFacts, control: dict[str, Any], bid: str, pgdata: str,
           opts: PhysicalOptions, options: EncodeOptions, ref: incremental.Reference | None = None) -> dict[str, Any]:
    label = f"saveit-backup {bid}"
    if facts.major >= 15:
        start_lsn = str(conn.execute("SELECT pg_backup_start(%s, true)::text", [label]).fetchone()[0])
    else:
        start_lsn = str(conn.execute("SELECT pg_start_backup(%s, true, false)::text", [label]).fetchone()[0])
    log.info("backup %s started at %s", bid, start_lsn)
    tablespace_dir = f"PG_{facts.major}_{control['catalog_version_no']}" if facts.major >= 10 else ""
    found = scan(pgdata, tablespace_dir)
    checks = ChecksumReport(enabled=facts.data_checksums and opts.verify_checksums)
    # Tablespace paths are "pg_tblspc/<oid>/<tablespace_dir>/...": the reader maps the oid to the location itself.
    reader = FileReader(pgdata, {t["oid"]: t["location"] for t in found.tablespaces}, checks,
                        int(Lsn.parse(start_lsn)))
    plan = plan_objects(found.files)
    t0 = time.monotonic()
    incr: dict[str, Any] = {}
    if ref is None:
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs), thread_name_prefix="backup") as pool:
            objects = list(pool.map(lambda item: _store_object(repo, bid, item[0], item[1], reader, options), plan))
        files = [f.to_dict() for f in found.files]
    else:
        open_reference = None
        if opts.page_xor:  # changed pages stored as XOR with the reference's: read back from the repository
            cache, lock = incremental.PackCache(repo, REFERENCE_CACHE), threading.Lock()

            def open_reference(entry: dict[str, Any]) -> Iterator[bytes | memoryview]:
                return incremental.reference_windows(repo, cache, entry, lock, int(control["block_size"]))

        producer = incremental.DeltaProducer(reader, ref, bid, int(control["block_size"]), int(control["blocks_per_segment"]),
                                             open_reference)
        works = {id(f): incremental.IncrementalWork(f, ref.files.get(f.path)) for f in found.files}

        def one(item: tuple[str, list[FileEntry]]) -> ObjectEntry | None:
            return incremental.store_incremental(repo, bid, item[0], [works[id(f)] for f in item[1]], producer, options,
                                                 BIG_FILE)

        with ThreadPoolExecutor(max_workers=max(1, opts.jobs), thread_name_prefix="backup") as pool:
            objects = [o for o in pool.map(one, plan) if o is not None]
        files = [works[id(f)].out for f in found.files]
        incr = producer.stats.to_dict()
        log.info("%s against %s: %d files whole, %d as block deltas (%d of %d pages), %d unchanged", bid, ref.manifest.id,
                 incr["files_full"], incr["files_incremental"], incr["pages_stored"], incr["pages_read"], incr["files_unchanged"])
    read_bytes = sum(f.size for f in found.files)
    log.info("copied %d files (%d bytes) in %d objects, %.1f s", len(found.files), read_bytes, len(objects), time.monotonic() - t0)
    # wait_for_archive = false: the server would check the archive once and then sleep in 1 s steps (about
    # 1 s per backup); wait_for_wal polls the repository for the same segments instead.
    if facts.major >= 15:
        row = conn.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)").fetchone()
    else:
        row = conn.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)").fetchone()
    stop_lsn, labelfile, spcmap = str(row[0]), str(row[1]), str(row[2] or "")
    parsed = parse_backup_label(labelfile)
    tli = parsed["start_timeline"] or int(parsed["start_wal_file"][:8], 16)
    if checks.bad:
        log.warning("%d page(s) with bad checksums found; listed in the manifest (physical.checksums)", checks.bad)
    return {"mode": "local", "start_lsn": str(parsed["start_wal_lsn"]), "stop_lsn": stop_lsn, "timeline": tli,
            "checkpoint_lsn": str(parsed["checkpoint_lsn"]), "backup_label": labelfile, "tablespace_map": spcmap,
            "tablespaces": found.tablespaces, "tablespace_dir": tablespace_dir,
            "files": files, "dirs": found.dirs, "links": found.links,
            "checksums": checks.to_dict(), "bundling": {"big_file": BIG_FILE, "pack_target": PACK_TARGET},
            **({"incremental": incr} if ref is not None else {}), "_objects": objects}


# --- remote -------------------------------------------------------------------------------------
FETCH_WAL_MAX_BYTES = 4 << 30  # remote full backups of clusters up to this size take their WAL with -X fetch


class _Process:
    """A tool's stdout as chunks; its stderr collected (needed after success too)."""

    def __init__(self, cmd: list[str], env: dict[str, str], what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.err = b""
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def chunks(self) -> Iterator[bytes]:
        assert self.proc.stdout is not None
        try:
            while chunk := self.proc.stdout.read(READ_SIZE):
                yield chunk
            rc = self.proc.wait()
            self._t.join()
            if rc != 0:
                lines = [ln for ln in self.stderr.strip().splitlines() if "error" in ln.lower()] or self.stderr.strip().splitlines()
                raise PgToolError(f"{self.what} failed: {lines[-1] if lines else f'exit status {rc}'}")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _remote(ctx: Context, repo: Repository, conn: Any, facts: ServerFacts, control: dict[str, Any], bid: str,
            opts: PhysicalOptions, options: EncodeOptions, ref: incremental.Reference | None = None) -> dict[str, Any]:
    spaces = int(conn.execute("SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')").fetchone()[0])
    if spaces:
        raise ConfigError(f"the cluster has {spaces} tablespace(s); remote mode streams one tar and cannot include them",
                          hint="back up with --pgdata (local mode) on the database host")
    tool = find_tool("pg_basebackup", ctx.settings.pg_bindir, facts.major)
    base_dsn, pw_env = split_password(ctx.settings.dbname)
    # pg_basebackup cannot add its backup_manifest to a server-compressed tar on stdout: where the server
    # can take incrementals (which need the manifest) the tar comes uncompressed and our pipeline compresses.
    capable = ref is not None or not native_incremental.server_blocker(conn, facts)
    compress = not capable and opts.server_compression and _server_has_zstd(conn, facts)
    keep_manifest = not compress and facts.major >= 13  # manifests exist since PostgreSQL 13
    label = f"saveit-backup {bid}"
    # -X fetch: the server does not wait for its archiver (with -X none it sleeps in 1 s steps until the last
    # segment is archived, about 1 s per backup); the tar then ends with the backup's WAL segments. As in local
    # mode, the WAL is also awaited in and copied from the archive below, so the backup does not depend on them.
    # Should the server have recycled a segment before sending it (a checkpoint during the backup, wal_keep_size
    # 0), the backup is taken again with -X none; clusters above FETCH_WAL_MAX_BYTES, whose backups last long
    # enough for that to be likely and for 1 s not to matter, use -X none from the start.
    size = int(conn.execute("SELECT sum(pg_database_size(oid)) FROM pg_database").fetchone()[0] or 0)
    cmd = [tool, "-D", "-", "-Ft", "-X", "fetch" if size <= FETCH_WAL_MAX_BYTES else "none", "--checkpoint=fast", "--label", label]
    if compress:
        # The compressed stream goes to the repository as it is; the object's digest covers the stream.
        workers = opts.jobs if opts.jobs > 1 else 0
        cmd += ["--no-manifest", f"--compress=server-zstd:level=3{f',workers={workers}' if workers else ''}"]
    else:
        cmd += ["--manifest-checksums=SHA256"]
    if base_dsn:
        cmd += ["-d", base_dsn]
    name = "base.tar.zst" if compress else "base.tar"
    store = options._replace(codec="none") if compress else options
    tli_before = int(conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0])
    known = _backup_history_names(repo, tli_before)
    tap = TarMemberTap("backup_manifest", limit=1 << 30)
    with ExitStack() as stack:
        if ref is not None:
            cmd.append(f"--incremental={stack.enter_context(native_incremental.reference_manifest_file(repo, ref.manifest))}")
            log.info("backup %s: pg_basebackup --incremental against backup %s", bid, ref.manifest.id)
        try:
            digest = _stream_basebackup(repo, layout.object_key(bid, name), cmd, pw_env, store, tap if keep_manifest else None)
        except PgToolError as exc:
            if "already been removed" not in exc.message or "fetch" not in cmd:
                raise
            log.warning("backup %s: %s; taking the backup again without WAL in the tar (-X none)", bid, exc.message)
            cmd[cmd.index("fetch")] = "none"
            label = f"{label} (-X none)"  # the failed attempt may have left a backup-history file under the first label
            cmd[cmd.index("--label") + 1] = label
            tap = TarMemberTap("backup_manifest", limit=1 << 30)
            digest = _stream_basebackup(repo, layout.object_key(bid, name), cmd, pw_env, store, tap if keep_manifest else None)
    objects = [_entry(name, digest)]
    if keep_manifest:
        if tap.content is None:
            raise PgToolError("pg_basebackup's tar holds no backup_manifest")
        mdigest = repo.put_object(layout.object_key(bid, native_incremental.MANIFEST_OBJECT), [tap.content], options)
        objects.append(_entry(native_incremental.MANIFEST_OBJECT, mdigest))
    history_name, history = _find_backup_history(repo, tli_before, known, label, min(60.0, opts.wal_timeout))
    parsed = parse_backup_label(history)
    fields = dict(ln.split(": ", 1) for ln in history.splitlines() if ": " in ln)
    stop = re.match(r"(\S+) \(file ([0-9A-F]{24})\)", fields.get("STOP WAL LOCATION", ""))
    if not stop:
        raise PgToolError(f"backup history file {history_name} has no STOP WAL LOCATION")
    start_lsn, stop_lsn = parsed["start_wal_lsn"], Lsn.parse(stop.group(1))
    tli = parsed["start_timeline"] or int(parsed["start_wal_file"][:8], 16)
    label_lines = [ln for ln in history.splitlines() if not ln.startswith("STOP ")]
    return {"mode": "remote", "start_lsn": str(start_lsn), "stop_lsn": str(stop_lsn), "timeline": tli,
            "checkpoint_lsn": str(parsed["checkpoint_lsn"]), "backup_label": "\n".join(label_lines) + "\n",
            "backup_history": history, "backup_history_file": history_name, "tablespace_map": "", "files": [],
            "archive": {"object": name, "content": "tar.zst" if compress else "tar",
                        "server_compression": "zstd:level=3" if compress else None,
                        "pg_backup_manifest": not compress,
                        "manifest_object": native_incremental.MANIFEST_OBJECT if keep_manifest else None},
            "_objects": objects}


def _stream_basebackup(repo: Repository, key: str, cmd: list[str], pw_env: dict[str, str], store: EncodeOptions,
                       tap: TarMemberTap | None) -> Digest:
    """pg_basebackup's tar on stdout into the object ``key`` (``tap`` keeps a member on the way)."""
    proc = _Process(cmd, tool_env(pw_env), "pg_basebackup")
    return repo.put_object(key, tap.observe(proc.chunks()) if tap is not None else proc.chunks(), store)


def _backup_history_names(repo: Repository, tli: int) -> set[str]:
    prefix = layout.wal_key(f"{tli:08X}.history").rsplit("/", 1)[0] + "/"
    return {info.key.rsplit("/", 1)[1] for info in repo.storage.list(prefix) if info.key.endswith(".backup")}


def _find_backup_history(repo: Repository, tli: int, known: set[str], label: str, timeout: float) -> tuple[str, str]:
    """The backup-history file pg_basebackup's backup left in the archive, found by its LABEL line."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        for name in sorted(_backup_history_names(repo, tli) - known):
            text = b"".join(repo.read_object(layout.wal_key(name))).decode()
            if f"LABEL: {label}\n" in text + "\n":
                return name, text
            known.add(name)
        if time.monotonic() > deadline:
            raise PgToolError(f"the backup-history file of '{label}' did not reach the WAL archive within {timeout:.0f} s",
                              hint="check archive_command = 'saveit-backup wal-push %p' and pg_stat_archiver")
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


def _server_has_zstd(conn: Any, facts: ServerFacts) -> bool:
    """PostgreSQL 15+ built with zstd (server-side compression for BASE_BACKUP)."""
    if facts.major < 15:
        return False
    try:
        row = conn.execute("SELECT count(*) FROM pg_config() WHERE name = 'CONFIGURE' AND setting LIKE '%%with-zstd%%'").fetchone()
    except Exception:  # pg_config() needs superuser or pg_read_all_settings: assume not
        return False
    return bool(row and row[0])
