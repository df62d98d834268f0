"""Restore test: prove the newest logical backup restores, and measure how long it takes (RTO).

The runbook's monthly restore test, automated:

1. choose the newest logical backup that verifies (as ``restore latest`` does);
2. create a scratch database ``<db>_restore_test_<UTC timestamp>`` on the configured server;
3. restore into it and compare every table's row count with the manifest;
4. run the runbook's sample queries: row counts of users/organizations/sites/meters when present,
   ``SELECT id, email FROM users LIMIT 5`` and ``SELECT id, name FROM organizations LIMIT 5``
   when those tables exist, else ``SELECT * FROM <largest table> LIMIT 5``;
5. drop the scratch database (always).

The measured RTO is the wall time of steps 1 to 3: from choosing the backup to the restored data
checked.  The result (never the rows themselves) is stored in the repository at
``service/restore-test.json`` for ``status`` and the service's metrics.
Restore hooks (BACKUP_RESTORE_PRE_HOOK/POST_HOOK) are not run: the application is not stopped
for a scratch database.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from saveit_backup.compose import Context
from saveit_backup.domain.manifest import iso, utcnow
from saveit_backup.errors import ConfigError, RestoreMismatch, SaveitError
from saveit_backup.ops.progress import Progress

log = logging.getLogger(__name__)

RESTORE_TEST_KEY = "service/restore-test.json"
RUNBOOK_COUNT_TABLES = ("users", "organizations", "sites", "meters")
RUNBOOK_SAMPLES = (("users", ("id", "email")), ("organizations", ("id", "name")))
MAX_IDENT = 63


def scratch_name(database: str, now_text: str) -> str:
    suffix = f"_restore_test_{now_text}"
    return (database or "db")[: MAX_IDENT - len(suffix)] + suffix


def _public_columns(conn: Any, table: str) -> set[str]:
    rows = conn.execute("SELECT a.attname FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 "
                        "AND NOT a.attisdropped", [table]).fetchall()
    return {str(r[0]) for r in rows}


def sample_queries(conn: Any) -> list[dict[str, Any]]:
    """Run the runbook's sample queries where their tables exist; report row numbers, never the rows."""
    from psycopg import sql

    out: list[dict[str, Any]] = []
    for table in RUNBOOK_COUNT_TABLES:
        if _public_columns(conn, table):
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
            out.append({"query": f"SELECT count(*) FROM {table}", "rows": int(row[0]), "ok": True})
    for table, columns in RUNBOOK_SAMPLES:
        if set(columns) <= _public_columns(conn, table):
            query = sql.SQL("SELECT {} FROM {} LIMIT 5").format(sql.SQL(", ").join(map(sql.Identifier, columns)),
                                                                 sql.Identifier(table))
            rows = conn.execute(query).fetchall()
            out.append({"query": f"SELECT {', '.join(columns)} FROM {table} LIMIT 5", "rows": len(rows), "ok": True})
    if not any(q["query"].endswith("LIMIT 5") for q in out):
        largest = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg_toast%%' ORDER BY pg_total_relation_size(c.oid) DESC, 1, 2 LIMIT 1").fetchone()
        if largest:
            query = sql.SQL("SELECT * FROM {}.{} LIMIT 5").format(sql.Identifier(largest[0]), sql.Identifier(largest[1]))
            rows = conn.execute(query).fetchall()
            out.append({"query": f"SELECT * FROM {largest[0]}.{largest[1]} LIMIT 5", "rows": len(rows), "ok": True})
    return out


def save_result(ctx: Context, result: dict[str, Any]) -> None:
    try:
        ctx.repo.storage.put(RESTORE_TEST_KEY, json.dumps(result, indent=1, default=str).encode())
    except SaveitError as exc:
        log.warning("could not record the restore test result in the repository: %s", exc)


def load_result(ctx: Context) -> dict[str, Any] | None:
    from saveit_backup.errors import NotFound
    from saveit_backup.storage.base import read_all

    try:
        body = json.loads(read_all(ctx.repo.storage, RESTORE_TEST_KEY))
    except NotFound:
        return None
    except ValueError:
        log.warning("%s is not valid JSON; ignoring it", RESTORE_TEST_KEY)
        return None
    return body if isinstance(body, dict) else None


def run_restore_test(ctx: Context, keep: bool = False, record: bool = True) -> dict[str, Any]:
    """Run the restore test; returns the result dict (also stored); raises on failure after recording it."""
    from psycopg import sql

    from saveit_backup.ops.logical_restore import RestoreRequest, choose_backup, restore_logical
    from saveit_backup.pg.conn import connect, describe_dsn, with_dbname

    settings = ctx.settings.with_values(restore_pre_hook="", restore_post_hook="")
    test_ctx = Context(settings)
    repo = test_ctx.repo
    repo.load_config()
    started = utcnow()
    t0 = time.monotonic()
    result: dict[str, Any] = {"started": iso(started), "ok": False, "backup_id": None, "scratch_database": None,
                              "duration_seconds": None, "tables": [], "sample_queries": [], "error": None}
    admin = None
    scratch = ""
    try:
        manifest = choose_backup(repo, "latest", "logical", False, settings.jobs)
        result["backup_id"] = manifest.id
        if manifest.options.get("all_databases"):
            raise ConfigError(f"backup {manifest.id} holds several databases; the restore test needs a single-database backup")
        scratch = scratch_name(manifest.database, started.strftime("%Y%m%d%H%M%S"))
        result["scratch_database"] = scratch
        admin = connect(settings.dbname)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
        target = with_dbname(settings.dbname, scratch)
        log.info("restore test: restoring backup %s into scratch database %s", manifest.id, describe_dsn(target))
        report = restore_logical(test_ctx, RestoreRequest(manifest.id, target, jobs=max(1, settings.jobs),
                                                          allow_environment=True, snapshot_first=False), Progress(False))
        result["duration_seconds"] = round(time.monotonic() - t0, 3)
        result["tables"] = [{"table": t.table, "expected": t.expected, "restored": t.restored, "ok": t.ok} for t in report.tables]
        conn = connect(target)
        try:
            result["sample_queries"] = sample_queries(conn)
        finally:
            conn.close()
        bad = [t for t in report.tables if not t.ok]
        if bad:
            raise RestoreMismatch(f"restore test of {manifest.id}: {len(bad)} table(s) differ: "
                                  + ", ".join(f"{t.table} {t.restored} != {t.expected}" for t in bad[:5]))
        result["ok"] = True
        return result
    except SaveitError as exc:
        result["error"] = exc.to_dict()
        raise
    except Exception as exc:  # psycopg errors from CREATE DATABASE or the sample queries
        result["error"] = {"code": "", "message": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                           "hint": "", "kind": type(exc).__name__}
        raise
    finally:
        if admin is not None:
            if scratch and not keep:
                try:
                    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch)))
                except Exception as exc:
                    log.warning("restore test: could not drop scratch database %s: %s", scratch, exc)
            admin.close()
        result["finished"] = iso(utcnow())
        result["total_seconds"] = round(time.monotonic() - t0, 3)
        result["kept"] = bool(keep and scratch)
        if record:
            save_result(ctx, result)
