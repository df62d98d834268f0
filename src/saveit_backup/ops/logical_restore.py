"""Restore logical backups with pg_restore, then compare row counts with the manifest."""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from saveit_backup.compose import Context
from saveit_backup.domain.manifest import Manifest
from saveit_backup.errors import BackupNotFound, ConfigError, IntegrityError, PgToolError, RestoreMismatch, RestoreRefused
from saveit_backup.ops.copy_loader import (
    CopyLoader,
    CopyText,
    TableRows,
    WriterFailed,
    load_copy_stream,
    sql_statements,
    widen_send_buffer,
)
from saveit_backup.ops.early_post_data import EarlyPostData
from saveit_backup.ops.logical import (
    GLOBALS_OBJECT,
    RestoreReport,
    TableComparison,
    dump_object_name,
)
from saveit_backup.ops.progress import Progress
from saveit_backup.ops.verify import verify_backup
from saveit_backup.pg.conn import connect, describe_dsn, find_tool, split_password, tool_env, with_dbname
from saveit_backup.pg.copy_data import DataBlock
from saveit_backup.pg.custom_archive import COMPRESSION_NONE, ArchiveWriter, OffsetRecorder, TocEntry, patch_offsets
from saveit_backup.pipeline.threads import read_ahead
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class RestoreRequest:
    ref: str
    target_db: str
    tables: Sequence[str] = ()
    schemas: Sequence[str] = ()
    create: bool = False
    clean: bool = False
    jobs: int = 2
    no_fallback: bool = False
    database: str | None = None  # which database of an --all-databases backup
    no_owner: bool = False
    allow_environment: bool = False
    snapshot_first: bool = True  # --clean over existing data: take a logical backup of the target first


def choose_backup(repo: Repository, ref: str, kind: str, no_fallback: bool, jobs: int) -> Manifest:
    """``latest`` means the newest backup of ``kind`` that verifies; skipping one is said loudly."""
    if ref != "latest":
        return repo.load_manifest(ref)
    candidates = [m for m in reversed(repo.manifests()) if m.type == kind]
    if not candidates:
        raise BackupNotFound(f"no {kind} backup in {repo.storage.capabilities.url}")
    for manifest in candidates:
        report = verify_backup(repo, manifest, jobs)
        if report.ok:
            return manifest
        message = f"backup {manifest.id} fails verification: {'; '.join(report.problems)}"
        if no_fallback:
            raise IntegrityError(message, hint="restore an older backup by ID, or drop --no-fallback")
        print(f"WARNING: {message}; falling back to the previous backup", file=sys.stderr)
        log.warning("%s; falling back to the previous backup", message)
    raise IntegrityError(f"no {kind} backup in {repo.storage.capabilities.url} passes verification")


def _user_relations(conn: Any, tables: Sequence[tuple[str, str]] | None) -> list[str]:
    sql = ("SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
           " WHERE c.relkind IN ('r','p','v','m','S','f') AND n.nspname NOT IN ('pg_catalog','information_schema')"
           " AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'")
    rows = [str(r[0]) for r in conn.execute(sql).fetchall()]
    if tables is None:
        return rows
    wanted = {f"{s}.{n}" for s, n in tables}
    return [r for r in rows if r in wanted]


def _ensure_database(target_dsn: str, dbname: str) -> None:
    admin = connect(with_dbname(target_dsn, "postgres"))
    try:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
        if not exists:
            from psycopg import sql

            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            log.info("created database %s", dbname)
    finally:
        admin.close()


def _target_dbname(target_dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(target_dsn).get("dbname") if target_dsn else None
    return str(name or os.environ.get("PGDATABASE") or "")


def restore_logical(ctx: Context, req: RestoreRequest, progress: Progress) -> RestoreReport:
    repo = ctx.repo
    repo.load_config()
    manifest = choose_backup(repo, req.ref, "logical", req.no_fallback, ctx.settings.jobs)
    if manifest.type != "logical":
        raise ConfigError(f"backup {manifest.id} is a {manifest.type} backup", hint="restore physical backups with --target-dir")
    env_label = ctx.settings.environment
    if manifest.environment and env_label and manifest.environment != env_label and not req.allow_environment:
        raise RestoreRefused(
            f"backup {manifest.id} comes from environment '{manifest.environment}' but this is '{env_label}'",
            hint="check the target; pass --allow-environment-mismatch if this restore is intended",
        )
    all_db = bool(manifest.options.get("all_databases"))
    source_db = req.database or (manifest.database if not all_db else "")
    if all_db and not req.database:
        raise ConfigError("this backup holds several databases", hint="choose one with --database NAME")
    name = dump_object_name(source_db, all_db)
    try:
        entry = manifest.object(name)
    except KeyError:
        raise BackupNotFound(f"backup {manifest.id} holds no database {source_db!r}") from None

    target = req.target_db
    if req.create:
        dbname = _target_dbname(target)
        if not dbname:
            raise ConfigError("--create needs a database name in --target-db")
        _ensure_database(target, dbname)
    expected = [t for t in manifest.tables if t.database == source_db or not all_db]
    if req.tables:
        wanted = set(req.tables)
        expected = [t for t in expected if t.name in wanted or t.qualified in wanted]
    if req.schemas:
        expected = [t for t in expected if t.schema in set(req.schemas)]

    conn = connect(target)
    try:
        existing = _user_relations(conn, [(t.schema, t.name) for t in expected] if (req.tables or req.schemas) else None)
    finally:
        conn.close()
    if existing and not req.clean:
        shown = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise RestoreRefused(f"target {describe_dsn(target)} is not empty ({len(existing)} relations: {shown})")
    report = RestoreReport(manifest.id, describe_dsn(target))
    run_hook("pre-restore", ctx.settings.restore_pre_hook, manifest.id, target)
    try:
        if existing and req.snapshot_first:
            report.snapshot_id = _snapshot_target(ctx, target)
        counted = _pg_restore(ctx, manifest, entry, req, target, progress, expected)
    finally:
        run_hook("post-restore", ctx.settings.restore_post_hook, manifest.id, target)
    counting = time.monotonic()
    _compare_counts(report, expected, target, req.jobs, counted)
    log.info("restore phases: row counts of %d tables after pg_restore %.2f s (%d counted during it)",
             len(expected) - len(counted), time.monotonic() - counting, len(counted))
    return report


def run_hook(stage: str, command: str, backup_id: str, target: str) -> None:
    """Maintenance hooks (stop/start the application); a failing pre-hook aborts the restore."""
    if not command:
        return
    env = dict(os.environ, SAVEIT_BACKUP_ID=backup_id, SAVEIT_RESTORE_TARGET=describe_dsn(target), SAVEIT_HOOK=stage)
    proc = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, check=False)
    log.info("%s hook exited %d", stage, proc.returncode)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RestoreRefused(f"{stage} hook failed: {tail[0]}", hint="fix the hook (BACKUP_RESTORE_PRE_HOOK / POST_HOOK) or unset it")


def _snapshot_target(ctx: Context, target: str) -> str:
    """Back up what the restore is about to replace; the new backup's ID is reported."""
    from saveit_backup.ops.logical import Selection, backup_logical
    from saveit_backup.ops.progress import Progress

    snap_ctx = Context(ctx.settings.with_values(dbname=target, environment=ctx.settings.environment))
    manifest = backup_logical(snap_ctx, Selection(), Progress(False))
    print(f"snapshot of the current target taken first: backup {manifest.id}", file=sys.stderr)
    return manifest.id


def _pg_restore(ctx: Context, manifest: Manifest, entry: Any, req: RestoreRequest, target: str, progress: Progress,
                expected: Sequence[Any]) -> dict[tuple[str, str], int | None]:
    """Run pg_restore; return the row counts of the tables already counted while it ran (``-j`` only)."""
    repo = ctx.repo
    pg_restore = find_tool("pg_restore", ctx.settings.pg_bindir, manifest.pg_version // 10000)
    base_dsn, pw_env = split_password(target)
    args = [pg_restore, "--exit-on-error", "-d", base_dsn or _target_dbname(target) or "postgres"]
    if req.clean:
        args += ["--clean", "--if-exists"]
    if req.no_owner:
        args += ["--no-owner", "--no-acl"]
    selection: list[str] = []
    for table in req.tables:
        selection += ["-t", table.rpartition(".")[2]]
    schemas = set(req.schemas) | {table.rpartition(".")[0] for table in req.tables if "." in table}
    for schema in sorted(schemas):
        selection += ["-n", schema]
    args += selection
    key = layout.object_key(manifest.id, entry.name)
    stream = progress.track(repo.read_object(key), f"restore {manifest.id}", entry.size)
    env = tool_env(pw_env)
    if req.jobs > 1 and not req.clean:
        return _restore_in_sections(pg_restore, args, selection, read_ahead(stream, depth=8), env, target, req.jobs)
    if req.jobs > 1:
        # Parallel pg_restore needs a seekable archive: decode to a private temporary file.
        with tempfile.TemporaryDirectory(prefix="saveit-restore-") as tmp:
            path = Path(tmp) / "archive.dump"
            started = time.monotonic()
            offsets = OffsetRecorder()
            with open(path, "w+b") as out:
                for chunk in read_ahead(stream, depth=8):  # decode in a thread while this one writes
                    out.write(chunk)
                    offsets.feed(chunk)
                out.flush()
                # pg_dump wrote to a pipe: without data offsets pg_restore -j workers scan for their blocks
                patched = patch_offsets(out.fileno(), offsets)
            decoded = time.monotonic()
            early = EarlyCounts(target, {(t.schema, t.name) for t in expected}, offsets.entries)
            try:
                _run(args + ["-v", "-j", str(req.jobs), str(path)], env, None, on_stderr_line=early.on_line)
            finally:
                counted = early.finish()
            log.info("restore phases: decode %.2f s (%d bytes, data offsets set for %d TOC entries), pg_restore -j%d %.2f s",
                     decoded - started, offsets.size, patched, req.jobs, time.monotonic() - decoded)
            return counted
    _run(args, env, stream)
    return {}


_TABLE_DATA_ITEM = re.compile(rb"\d+; \d+ \d+ TABLE DATA ")


def _restore_in_sections(pg_restore: str, args: list[str], selection: list[str], chunks: Iterator[bytes],
                         env: dict[str, str], target: str, jobs: int) -> dict[tuple[str, str], int | None]:
    """Restore the archive decoded in ``chunks`` section by section, loading table data as it is decoded:

    1. the header and table of contents are written to a private temporary file, listed (``pg_restore -l``
       with the selection) and the pre-data section restored from it;
    2. the whole archive goes to ``pg_restore --data-only -f -`` of the selected TABLE DATA entries, whose
       COPY text ``copy_loader`` loads over ``jobs`` connections, every table split across all of them
       (pg_restore -j would load each table on one); at the same time the rest of the archive but its TABLE
       DATA blocks (large objects) goes on to the file, so the file stays small;
    3. the rest of the data section (sequence values, large objects) and then ``pg_restore -j`` of the
       post-data section run from the finished file, its offsets patched (TABLE DATA entries: no data).

    Returns COPY's row counts.  Not for ``--clean``: its drops must run before any section, in pg_restore's
    order (foreign keys first).
    """
    phases: list[str] = []
    counts: dict[tuple[str, str], int] = {}
    began = time.monotonic()

    def phase(name: str) -> None:
        nonlocal began
        now = time.monotonic()
        phases.append(f"{name} {now - began:.2f} s")
        began = now

    with tempfile.TemporaryDirectory(prefix="saveit-restore-") as tmp:
        path = Path(tmp) / "archive.dump"
        offsets = OffsetRecorder(drop_table_data=True)
        with open(path, "w+b") as out:
            inline = InlineTableData(offsets)
            archive = ArchiveWriter(out, offsets, inline.on_dropped)

            def write(chunk: bytes) -> None:
                try:
                    archive.feed(chunk)
                except ValueError as exc:
                    raise IntegrityError(f"{exc}; restore with --jobs 1") from None

            head: list[bytes] = []  # the chunks through the table of contents
            for chunk in chunks:
                write(chunk)
                head.append(chunk)
                if offsets.toc_end is not None or offsets.problem is not None:
                    break
            if offsets.toc_end is None:  # not an archive the recorder follows: all of it to the file, plain pg_restore -j
                log.info("restoring with pg_restore -j%d alone: %s", jobs, offsets.problem or "no table of contents")
                head.clear()
                for chunk in chunks:
                    write(chunk)
                archive.finish()
                out.flush()
                _run(args + ["-j", str(jobs), str(path)], env, None)
                return {}
            out.flush()
            others, table_data, listing, selected = _section_lists(pg_restore, selection, path, env)
            phase("table of contents")
            _run(args + ["-L", str(others), "--section=pre-data", str(path)], env, None)
            phase("pre-data")
            early: EarlyPostData | None = None
            cut_here = inline.usable(selected)  # else (or with no table data) the hook keeps nothing
            try:
                if selected:
                    # a loaded table's own indexes are built while the next tables load (the file's TOC is complete)
                    early = EarlyPostData(offsets.entries, listing, Path(tmp),
                                          lambda items: _run(args + ["-L", str(items), str(path)], env, None))
                    how, counts = _load_all_table_data(pg_restore, path, table_data, selected, cut_here, inline, env, target,
                                                       jobs, head, chunks, write, early.table_loaded)
                    done, running = early.stop()
                    restored = done | running
                    if any(set(offsets.entries[i].deps) & running for i in listing if i in offsets.entries and i not in restored):
                        early.join()  # the rest needs the batch under way (a foreign key on its key)
                    phase(f"decode and table data over {jobs} connections, {how} ({len(restored)} post-data items during it)")
                    if restored:
                        others.write_bytes(b"".join((b";" if i in restored else b"") + ln + b"\n" for i, ln in listing.items()))
                for chunk in chunks:
                    write(chunk)
                archive.finish()
                out.flush()
                if patch_offsets(out.fileno(), offsets) == 0 and offsets.dropped:
                    raise IntegrityError(f"cannot rewrite the archive's table of contents ({offsets.problem or 'see --verbose'}); "
                                         "restore with --jobs 1")
                _run(args + ["-L", str(others), "--section=data", str(path)], env, None)
                phase("other data")
                _run(args + ["-L", str(others), "-j", str(jobs), "--section=post-data", str(path)], env, None)
            except BaseException:
                if early is not None:  # nothing outlives the file; the first error is the one reported
                    early.stop()
                    with contextlib.suppress(Exception):
                        early.join()
                raise
            if early is not None:  # the batch under way was built next to the rest
                early.finish()
        phase(f"post-data -j{jobs}")
    log.info("restore phases: %s (%d bytes, %d of them TABLE DATA loaded by COPY)", ", ".join(phases), offsets.size,
             offsets.size - offsets.written_size())
    return dict(counts)


def _load_all_table_data(pg_restore: str, path: Path, table_data: Path, selected: set[int], cut_here: bool,
                         inline: InlineTableData, env: dict[str, str], target: str, jobs: int, head: list[bytes],
                         chunks: Iterator[bytes], write: Callable[[bytes], None],
                         on_table: Callable[[tuple[str, str]], None]) -> tuple[str, dict[tuple[str, str], int]]:
    """Load the selected TABLE DATA (dump IDs ``selected``, listed in ``table_data`` for ``pg_restore -L``) while
    the rest of the archive is decoded into ``write``: cut from the archive by ``inline`` when ``cut_here``
    (``inline.usable``), else through pg_restore's text."""
    if not cut_here:
        return "COPY text from pg_restore", _load_table_data([pg_restore, "--data-only", "-L", str(table_data), "-f", "-"],
                                                             env, target, jobs, head, chunks, write, on_table)
    # pg_restore's own session settings for this archive (encoding, search_path, row_security...)
    preamble = subprocess.run([pg_restore, "--data-only", "-L", os.devnull, "-f", "-", str(path)], capture_output=True, env=env,
                              check=False)
    if preamble.returncode != 0:
        raise PgToolError(f"pg_restore failed: {(preamble.stderr.decode(errors='replace').strip().splitlines() or ['?'])[-1]}")
    counts = _load_inline(inline, list(sql_statements(preamble.stdout.splitlines())), target, jobs, chunks, write, on_table)
    missing = selected - inline.loaded
    if missing or inline.recorder.problem:
        raise IntegrityError(f"the data of {len(missing)} of {len(selected)} tables was not found in the archive "
                             f"({inline.recorder.problem or 'blocks missing'}); restore with --jobs 1",
                             hint="pg_restore alone reads archives this restore cannot follow")
    return "COPY text cut from the archive", counts


class InlineTableData:
    """The TABLE DATA blocks an ``ArchiveWriter`` drops, turned into COPY text (``pg.copy_data``) for a
    ``CopyLoader``: its ``on_dropped`` hook.  Until ``start`` the bytes wait (the decode reaches the first
    block while the table of contents is read); ``usable`` says whether the archive allows it (uncompressed,
    a COPY statement for every selected entry) and, if not, switches the hook off."""

    def __init__(self, recorder: OffsetRecorder) -> None:
        self.recorder = recorder
        self.selected: set[int] = set()
        self.loaded: set[int] = set()  # selected entries whose whole block was loaded
        self.backlog: list[tuple[int, bytes, bool]] | None = []
        self.loader: CopyLoader | None = None
        self.start_of: int | None = None  # the block being read
        self.block: DataBlock | None = None
        self.rows: TableRows | None = None

    def usable(self, selected: set[int]) -> bool:
        entries = self.recorder.entries
        ok = bool(selected) and self.recorder.compression == COMPRESSION_NONE and all(
            i in entries and entries[i].copy_stmt.startswith(b"COPY ") for i in selected)
        if not ok:
            self.backlog = None
        self.selected = selected
        return ok

    def start(self, loader: CopyLoader) -> None:
        self.loader = loader
        backlog, self.backlog = self.backlog or [], None
        for start, data, ended in backlog:
            self.on_dropped(start, memoryview(data), ended)

    def on_dropped(self, start: int, data: memoryview, ended: bool) -> None:
        if self.loader is None:
            if self.backlog is not None:
                self.backlog.append((start, bytes(data), ended))
            return
        if start != self.start_of:
            self.end_block()
            self.start_of = start
            dump_id = self.recorder.block_at[start]
            if dump_id in self.selected:
                entry = self.recorder.entries[dump_id]
                self.loader.begin(entry.copy_stmt.rstrip(), (entry.namespace, entry.tag))
                self.block, self.rows = DataBlock(self.recorder.int_size), TableRows(self.loader)
        if self.block is not None and self.rows is not None:
            for piece in self.block.feed(data):
                self.rows.add(piece)
        if ended:
            self.end_block()

    def end_block(self) -> None:
        block, rows, self.block, self.rows = self.block, self.rows, None, None
        if block is not None and rows is not None and self.loader is not None:
            for piece in block.finish():
                rows.add(piece)
            rows.finish()
            self.loader.end()
            if self.start_of is not None:
                self.loaded.add(self.recorder.block_at[self.start_of])


def _load_inline(inline: InlineTableData, preamble: list[bytes], target: str, jobs: int, chunks: Iterator[bytes],
                 write: Callable[[bytes], None], on_table: Callable[[tuple[str, str]], None]) -> dict[tuple[str, str], int]:
    """Decode the rest of ``chunks`` into ``write``, whose ``ArchiveWriter`` hands the TABLE DATA blocks to
    ``inline``, loading them over ``jobs`` connections to ``target`` (each session set up with ``preamble``,
    pg_restore's own settings for the archive); return COPY's counts.  A failure stops the decode at once."""
    connections = _connect_all(target, jobs)
    loader = CopyLoader(connections, on_table)
    try:
        for statement in preamble:
            loader.sql(statement)
        inline.start(loader)
        for chunk in chunks:
            write(chunk)
        inline.end_block()
    except WriterFailed:
        pass
    finally:
        try:
            counts = loader.close()
        finally:
            for conn in connections:
                conn.close()
    return counts


def _connect_all(target: str, jobs: int) -> list[Any]:
    connections: list[Any] = []
    try:
        for _ in range(jobs):
            connections.append(connect(target))
            widen_send_buffer(connections[-1])
    except BaseException:
        for conn in connections:
            conn.close()
        raise
    return connections


def _load_table_data(cmd: list[str], env: dict[str, str], target: str, jobs: int, head: list[bytes],
                     chunks: Iterator[bytes], write: Callable[[bytes], None],
                     on_table: Callable[[tuple[str, str]], None] | None = None) -> dict[tuple[str, str], int]:
    """Feed ``head`` and then the rest of ``chunks`` (each also passed to ``write``) to the pg_restore of ``cmd``
    while ``load_copy_stream`` loads its COPY text over ``jobs`` connections to ``target``; return its counts.
    A failure stops the decode at once and is raised."""
    connections = _connect_all(target, jobs)
    text = CopyText(cmd, env)
    counts: dict[tuple[str, str], int] = {}
    failure: list[BaseException] = []

    def load() -> None:
        try:
            counts.update(load_copy_stream(text.chunks(), connections, on_table=on_table))
        except BaseException as exc:
            failure.append(exc)

    loader = threading.Thread(target=load, name="copy-load", daemon=True)
    loader.start()
    try:
        feeding = text.feed(b"".join(head))
        for chunk in chunks:
            write(chunk)
            if feeding and not text.feed(chunk):  # pg_restore stopped reading: done, failed or stopped
                feeding = False
                loader.join()
            if failure:
                break  # raised below, without decoding the rest
    except BaseException:
        text.kill()
        raise
    finally:
        text.end_input()
        loader.join()
        for conn in connections:
            conn.close()
    if failure:
        raise failure[0]
    return counts


def _section_lists(pg_restore: str, selection: list[str], path: Path,
                   env: dict[str, str]) -> tuple[Path, Path, dict[int, bytes], set[int]]:
    """(every selected item but TABLE DATA, the selected TABLE DATA items) as ``pg_restore -L`` lists, in the
    archive's order, next to ``path``; read from its table of contents.  Also the first list's lines by dump ID,
    and the dump IDs of the second."""
    listing = subprocess.run([pg_restore, "-l", *selection, str(path)], capture_output=True, env=env, check=False)
    if listing.returncode != 0:
        raise PgToolError(f"pg_restore -l failed: {(listing.stderr.decode(errors='replace').strip().splitlines() or ['?'])[-1]}")
    # bytes: names are in the archive's encoding
    items = [ln for ln in listing.stdout.splitlines() if ln.strip() and not ln.startswith(b";")]
    others = path.with_name("others.list")
    kept = {int(ln.split(b";", 1)[0]): ln for ln in items if not _TABLE_DATA_ITEM.match(ln)}
    others.write_bytes(b"".join(ln + b"\n" for ln in kept.values()))
    table_data = path.with_name("table-data.list")
    data_items = [ln for ln in items if _TABLE_DATA_ITEM.match(ln)]
    table_data.write_bytes(b"".join(ln + b"\n" for ln in data_items))
    return others, table_data, kept, {int(ln.split(b";", 1)[0]) for ln in data_items}


class EarlyCounts:
    """Row counts taken while ``pg_restore -j -v`` goes on: a table is counted (on one connection of its own)
    as soon as pg_restore reports its TABLE DATA item finished, i.e. committed, so the counting overlaps the
    index builds that follow instead of running after them.  Tables never reported are left to the caller.
    """

    FINISHED = re.compile(r"finished item (\d+) TABLE DATA ")

    def __init__(self, target: str, wanted: set[tuple[str, str]], entries: dict[int, TocEntry]) -> None:
        self.target = target
        self.wanted = wanted
        self.entries = entries
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="count")
        self.futures: dict[tuple[str, str], Future[int | None]] = {}
        self.conn: Any = None

    def on_line(self, line: str) -> None:
        """A line of pg_restore's stderr (called from the thread that reads it)."""
        m = self.FINISHED.search(line)
        entry = self.entries.get(int(m.group(1))) if m else None
        if entry is None:
            return
        key = (entry.namespace, entry.tag)
        if key in self.wanted and key not in self.futures:
            self.futures[key] = self.pool.submit(self._count, key)

    def _count(self, key: tuple[str, str]) -> int | None:
        if self.conn is None:
            self.conn = connect(self.target)
        return _count_rows(self.conn, *key)

    def finish(self) -> dict[tuple[str, str], int | None]:
        """Wait for the counts under way; close the connection."""
        self.pool.shutdown(wait=True)
        if self.conn is not None:
            self.conn.close()
        return {key: (f.result() if f.exception() is None else None) for key, f in self.futures.items()}


def _count_rows(conn: Any, schema: str, name: str) -> int | None:
    """``count(*)`` of one table; None when it cannot be counted (missing table: a mismatch)."""
    from psycopg import sql

    try:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name))).fetchone()
        return int(row[0]) if row else None
    except Exception:  # autocommit connection: nothing to roll back
        return None


def _compare_counts(report: RestoreReport, expected: list[Any], target: str, jobs: int = 2,
                    counted: dict[tuple[str, str], int | None] | None = None) -> None:
    """Compare with the manifest: the tables in ``counted`` as counted; the rest counted now over ``jobs`` connections."""
    counted = counted or {}
    local = threading.local()
    opened: list[Any] = []

    def count(t: Any) -> int | None:
        if (t.schema, t.name) in counted:
            return counted[(t.schema, t.name)]
        if not hasattr(local, "conn"):
            local.conn = connect(target)
            opened.append(local.conn)
        return _count_rows(local.conn, t.schema, t.name)

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for t, restored in zip(expected, pool.map(count, expected), strict=True):
                report.tables.append(TableComparison(t.qualified, t.rows, restored))
    finally:
        for conn in opened:
            conn.close()


def _run(cmd: list[str], env: dict[str, str], stdin_chunks: Iterable[bytes] | None,
         on_stderr_line: Callable[[str], None] | None = None) -> None:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_chunks is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tail: deque[str] = deque(maxlen=200)  # with -v pg_restore writes a line per item: keep the end for the error

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            if on_stderr_line is not None:
                try:
                    on_stderr_line(line)
                except Exception:  # an observer never breaks the restore
                    log.debug("stderr observer failed on %r", line, exc_info=True)

    t = threading.Thread(target=read_stderr, daemon=True)
    t.start()
    out_t = threading.Thread(target=lambda: proc.stdout.read(), daemon=True)  # type: ignore[union-attr]
    out_t.start()
    try:
        if stdin_chunks is not None:
            assert proc.stdin is not None
            try:
                for chunk in stdin_chunks:
                    proc.stdin.write(chunk)
            except BrokenPipeError:
                pass
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    t.join()
    if rc != 0:
        lines = [ln for ln in tail if ln.strip()]
        errors = [ln for ln in lines if "error:" in ln]
        shown = (errors or lines)[-1] if lines else f"exit status {rc}"
        raise PgToolError(f"{Path(cmd[0]).name} failed: {shown}")


def check_report(report: RestoreReport) -> None:
    bad = [t for t in report.tables if not t.ok]
    if bad:
        raise RestoreMismatch(f"{len(bad)} table(s) differ from the backup: " + ", ".join(
            f"{t.table} {t.restored} != {t.expected}" for t in bad[:5]))


def export_backup(ctx: Context, ref: str, path: str, fmt: str, database: str | None, progress: Progress) -> Manifest:
    """Write a file standard tools read: a pg_restore archive or a gzipped SQL script."""
    repo = ctx.repo
    repo.load_config()
    manifest = repo.resolve(ref)
    if manifest.type != "logical":
        raise ConfigError(f"export supports logical backups; {manifest.id} is {manifest.type}")
    all_db = bool(manifest.options.get("all_databases"))
    if all_db and not database:
        raise ConfigError("this backup holds several databases", hint="choose one with --database NAME (or 'globals')")
    name = GLOBALS_OBJECT if database == "globals" else dump_object_name(database or manifest.database, all_db)
    try:
        entry = manifest.object(name)
    except KeyError:
        raise BackupNotFound(f"backup {manifest.id} holds no object {name}") from None
    stream = progress.track(repo.read_object(layout.object_key(manifest.id, name)), f"export {manifest.id}", entry.size)
    tmp = f"{path}.partial"
    with open(tmp, "wb") as raw:
        if fmt == "dump" or name == GLOBALS_OBJECT:
            if name == GLOBALS_OBJECT and fmt == "sql.gz":
                with gzip.GzipFile(fileobj=raw, mode="wb") as gz:
                    for chunk in stream:
                        gz.write(chunk)
            else:
                for chunk in stream:
                    raw.write(chunk)
        elif fmt == "sql.gz":
            _archive_to_sql_gz(ctx, manifest, stream, raw)
        else:
            raise ConfigError(f"unknown export format {fmt!r}", hint="use --format dump or --format sql.gz")
    os.replace(tmp, path)
    return manifest


def _archive_to_sql_gz(ctx: Context, manifest: Manifest, stream: Iterable[bytes], raw: BinaryIO) -> None:
    pg_restore = find_tool("pg_restore", ctx.settings.pg_bindir, manifest.pg_version // 10000)
    proc = subprocess.Popen([pg_restore, "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin and proc.stdout

    def feed() -> None:
        try:
            for chunk in stream:
                proc.stdin.write(chunk)  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        finally:
            proc.stdin.close()  # type: ignore[union-attr]

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz:
        shutil.copyfileobj(proc.stdout, gz, 1 << 20)
    feeder.join()
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0:
        raise PgToolError(f"pg_restore -f - failed: {err.decode(errors='replace').strip()[-300:]}")
