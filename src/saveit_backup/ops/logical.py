"""Logical backups: pg_dump (custom format, uncompressed) streamed through the pipeline."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from saveit_backup import __version__
from saveit_backup.compose import Context
from saveit_backup.domain.manifest import Manifest, ObjectEntry, TableCount, iso, utcnow
from saveit_backup.errors import PgToolError
from saveit_backup.ops.progress import Progress
from saveit_backup.pg.conn import connect, find_tool, server_facts, split_password, tool_env, with_dbname
from saveit_backup.pipeline.threads import read_ahead
from saveit_backup.repo import layout

log = logging.getLogger(__name__)
READ_SIZE = 1 << 20
GLOBALS_OBJECT = "globals.sql"


def dump_object_name(database: str, all_databases: bool) -> str:
    return f"db-{database}.dump" if all_databases else "database.dump"


@dataclass
class Selection:
    tables: Sequence[str] = ()
    schemas: Sequence[str] = ()
    exclude_tables: Sequence[str] = ()
    all_databases: bool = False

    def pg_dump_args(self) -> list[str]:
        args: list[str] = []
        for t in self.tables:
            args += ["-t", t]
        for s in self.schemas:
            args += ["-n", s]
        for t in self.exclude_tables:
            args += ["-T", t]
        return args

    def to_options(self) -> dict[str, Any]:
        return {"tables": list(self.tables), "schemas": list(self.schemas), "exclude_tables": list(self.exclude_tables),
                "all_databases": self.all_databases}


def _pattern_sql(patterns: Sequence[str]) -> tuple[str, list[str]]:
    """psql-style patterns (``*``/``?`` wildcards, optional schema) to a SQL condition on n.nspname/c.relname."""
    clauses, params = [], []
    for pattern in patterns:
        schema, _, name = pattern.rpartition(".")
        like = name.replace("*", "%").replace("?", "_")
        if schema:
            clauses.append("(n.nspname LIKE %s AND c.relname LIKE %s)")
            params += [schema.replace("*", "%").replace("?", "_"), like]
        else:
            clauses.append("(c.relname LIKE %s AND pg_catalog.pg_table_is_visible(c.oid))")
            params.append(like)
    return " OR ".join(clauses), params


def selected_tables(conn: Any, selection: Selection) -> list[tuple[str, str]]:
    sql = ("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
           " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
           " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'"
           " AND n.nspname NOT LIKE 'pg_temp%%'")
    params: list[str] = []
    if selection.tables:
        cond, p = _pattern_sql(selection.tables)
        sql += f" AND ({cond})"
        params += p
    if selection.schemas:
        sql += " AND n.nspname = ANY(%s)"
        params.append(list(selection.schemas))  # type: ignore[arg-type]
    if selection.exclude_tables:
        cond, p = _pattern_sql(selection.exclude_tables)
        sql += f" AND NOT ({cond})"
        params += p
    return [(str(r[0]), str(r[1])) for r in conn.execute(sql + " ORDER BY 1, 2", params).fetchall()]


def count_rows(conn: Any, tables: list[tuple[str, str]], database: str) -> list[TableCount]:
    from psycopg import sql

    out = []
    for schema, name in tables:
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
        row = conn.execute(query).fetchone()
        out.append(TableCount(database, schema, name, int(row[0])))
    return out


def _stream_process(cmd: list[str], env: dict[str, str], what: str) -> Iterator[bytes]:
    """Yield a tool's stdout; raise PgToolError (before the last chunk is consumed) if it fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    errors: list[bytes] = []
    err_thread = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    err_thread.start()
    try:
        while chunk := proc.stdout.read(READ_SIZE):
            yield chunk
        rc = proc.wait()
        err_thread.join()
        if rc != 0:
            text = b"".join(errors).decode(errors="replace").strip().splitlines()
            detail = text[-1] if text else f"exit status {rc}"
            raise PgToolError(f"{what} failed: {detail}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def backup_logical(ctx: Context, selection: Selection, progress: Progress) -> Manifest:
    settings = ctx.settings
    repo = ctx.repo
    repo.ensure(auto_init=True)
    options = repo.write_options()
    dsn = settings.dbname
    with repo.lock("backup --type logical"):
        bid, started = repo.new_backup_id("logical")
        conn = connect(dsn)
        try:
            facts = server_facts(conn)
            pg_dump = find_tool("pg_dump", settings.pg_bindir, facts.major)
            if selection.all_databases:
                databases = [str(r[0]) for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1").fetchall()]
            else:
                databases = [facts.database]
            db_size = int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]
        finally:
            conn.close()
        manifest = Manifest(
            id=bid, type="logical", started=iso(started), pg_version=facts.version_num,
            system_identifier=facts.system_identifier, database="*" if selection.all_databases else facts.database,
            environment=settings.environment, host=socket.gethostname(), tool_version=__version__,
            encryption="aes-256-gcm" if options.encrypt else "none", options=selection.to_options(),
        )
        base_dsn, pw_env = split_password(dsn)
        env = tool_env(pw_env)
        if selection.all_databases:
            pg_dumpall = find_tool("pg_dumpall", settings.pg_bindir, facts.major)
            cmd = [pg_dumpall, "--globals-only"] + (["-d", base_dsn] if base_dsn else [])
            globals_stream = _stream_process(cmd, env, "pg_dumpall --globals-only")
            digest = repo.put_object(layout.object_key(bid, GLOBALS_OBJECT), globals_stream, options)
            manifest.objects.append(_entry(GLOBALS_OBJECT, digest))
        for database in databases:
            db_dsn = with_dbname(dsn, database) if selection.all_databases else dsn
            name = dump_object_name(database, selection.all_databases)
            entry, tables = _dump_database(repo, bid, name, db_dsn, database, pg_dump, selection, options, progress, db_size)
            manifest.objects.append(entry)
            manifest.tables += tables
        manifest.finished = iso(utcnow())
        repo.commit(manifest)
        log.info("backup %s committed: %d bytes stored", bid, manifest.stored_bytes)
        return manifest


def _dump_database(repo: Any, bid: str, name: str, dsn: str, database: str, pg_dump: str, selection: Selection,
                   options: Any, progress: Progress, size_hint: int) -> tuple[ObjectEntry, list[TableCount]]:
    """One snapshot: export it, count rows in it (in a thread) while pg_dump dumps it."""
    conn = connect(dsn, autocommit=False)
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = str(conn.execute("SELECT pg_export_snapshot()").fetchone()[0])  # type: ignore[index]
        tables = selected_tables(conn, selection)
        counts: list[TableCount] = []
        failure: list[BaseException] = []

        def count() -> None:
            try:
                counts.extend(count_rows(conn, tables, database))
            except BaseException as exc:
                failure.append(exc)

        base_dsn, pw_env = split_password(dsn)
        cmd = [pg_dump, "-Fc", "-Z0", f"--snapshot={snapshot}", *selection.pg_dump_args()]
        if base_dsn:
            cmd += ["-d", base_dsn]
        stream = _stream_process(cmd, tool_env(pw_env), f"pg_dump of {database}")
        counter = threading.Thread(target=count, name="row-counts", daemon=True)
        counter.start()
        # The snapshot stays exported while this transaction is open: pg_dump imports it at start.
        digest = repo.put_object(layout.object_key(bid, name),
                                 progress.track(read_ahead(stream), f"dump {database}", size_hint), options)
        counter.join()
        if failure:
            raise PgToolError(f"counting rows in {database} failed: {failure[0]}")
        return _entry(name, digest), counts
    finally:
        conn.close()


def _entry(name: str, digest: Any) -> ObjectEntry:
    return ObjectEntry(name, digest.plain_size, digest.stored_size, digest.plain_digest, digest.codec, digest.cipher)


@dataclass
class TableComparison:
    table: str
    expected: int
    restored: int | None

    @property
    def ok(self) -> bool:
        return self.restored == self.expected


@dataclass
class RestoreReport:
    backup_id: str
    target: str
    tables: list[TableComparison] = field(default_factory=list)
    snapshot_id: str | None = None

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)
