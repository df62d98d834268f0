"""The service's job table: job kind -> callable(ctx) -> Manifest | dict.

* ``full``: a physical full backup where one is configured (BACKUP_PGDATA, or
  BACKUP_PHYSICAL_MODE local/remote) and available in this build; otherwise a logical backup.
* ``incremental``: a block-level incremental in local mode (BACKUP_PGDATA); in remote mode
  ``pg_basebackup --incremental`` where the server can (17+, summarize_wal on), else skipped (WAL
  archiving keeps the RPO; a full backup every hour would cost too much); a logical backup when no
  physical backup is configured.
* ``logical``: a logical backup of the configured database.
* ``verify``: re-read the newest backup (raises IntegrityError when damaged).
* ``restore_test``: restore the newest logical backup into a scratch database (ops.restore_test).

Backups are followed by ``expire`` (retention); an expire failure is logged and reported,
but does not turn the committed backup into a failure.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from saveit_backup.compose import Context
from saveit_backup.domain.manifest import Manifest
from saveit_backup.errors import ConfigError, IntegrityError, RepositoryNotInitialized, SaveitError
from saveit_backup.ops.progress import Progress

log = logging.getLogger(__name__)

JobResult = Manifest | dict[str, Any]
JobFn = Callable[[Context], JobResult]
BACKUP_JOBS = ("full", "incremental", "logical")


def physical_configured(ctx: Context) -> bool:
    s = ctx.settings
    return bool(s.pgdata) or s.physical_mode in ("local", "remote")


def _physical(ctx: Context, kind: str) -> Manifest | None:
    """A physical backup of ``kind`` (full/incr), or None when this build cannot take one."""
    from saveit_backup.cli_physical import physical_backup

    s = ctx.settings
    args = argparse.Namespace(type=kind, remote=s.physical_mode == "remote", pgdata=s.pgdata or None, jobs=None,
                              table=None, schema=None, exclude_table=None, all_databases=False, sub_dbname=None,
                              json=True, quiet=True, verbose=False)
    try:
        return physical_backup(args, ctx, Progress(False))
    except ConfigError as exc:
        if "not available" not in exc.message:
            raise
        log.warning("physical %s backup not available in this build (%s): taking a logical backup instead", kind, exc.message)
        return None


def job_logical(ctx: Context) -> Manifest:
    from saveit_backup.ops.logical import Selection, backup_logical

    return backup_logical(ctx, Selection(), Progress(False))


def job_full(ctx: Context) -> Manifest:
    if physical_configured(ctx):
        manifest = _physical(ctx, "full")
        if manifest is not None:
            return manifest
    return job_logical(ctx)


def job_incremental(ctx: Context) -> JobResult:
    s = ctx.settings
    if s.physical_mode == "remote" and not s.pgdata:
        from saveit_backup.ops.native_incremental import unavailable

        why = unavailable(s.dbname)
        if why:  # an incr would fall back to a full backup every time: continuous WAL archiving covers the hour
            log.info("remote incremental backups unavailable (%s): skipped; WAL archiving keeps the RPO", why)
            return {"skipped": f"remote incremental backups unavailable: {why}"}
    if physical_configured(ctx):
        manifest = _physical(ctx, "incr")
        if manifest is not None:
            return manifest
    log.warning("no physical backup configured (BACKUP_PGDATA / BACKUP_PHYSICAL_MODE): the incremental job takes a "
                "logical backup")
    return job_logical(ctx)


def _nothing_yet(ctx: Context, kind: str | None) -> dict[str, Any] | None:
    """A check scheduled before the first backup is skipped (the backup job's own failures and the
    RPO objective report a repository without backups), not counted as a failure."""
    try:
        ctx.repo.load_config()
        found = [m for m in ctx.repo.manifests() if kind is None or m.type == kind]
    except RepositoryNotInitialized:
        found = []
    if found:
        return None
    what = f"no {kind} backup" if kind else "no backup"
    log.info("%s in the repository yet: nothing to check", what)
    return {"skipped": f"{what} in the repository yet"}


def job_verify(ctx: Context) -> dict[str, Any]:
    from saveit_backup.ops.verify import verify_backup

    skipped = _nothing_yet(ctx, None)
    if skipped:
        return skipped
    repo = ctx.repo
    manifest = repo.resolve("latest")
    report = verify_backup(repo, manifest, ctx.settings.jobs)
    result = {"backup_id": manifest.id, "objects": report.checked, "ok": report.ok, "problems": report.problems,
              "bytes": manifest.stored_bytes}
    if not report.ok:
        raise IntegrityError(f"verification of {manifest.id} failed: {'; '.join(report.problems[:3])}")
    return result


def job_restore_test(ctx: Context) -> dict[str, Any]:
    from saveit_backup.ops.restore_test import run_restore_test

    return _nothing_yet(ctx, "logical") or run_restore_test(ctx)


JOBS: dict[str, JobFn] = {
    "full": job_full,
    "incremental": job_incremental,
    "logical": job_logical,
    "verify": job_verify,
    "restore_test": job_restore_test,
}


def summarize(kind: str, result: JobResult) -> dict[str, Any]:
    """The figures of a finished job, as logged and reported (JSON-safe)."""
    if isinstance(result, Manifest):
        return {"job": kind, "backup_id": result.id, "type": result.type, "bytes": result.stored_bytes,
                "plain_bytes": result.plain_bytes, "backup_duration_seconds": round(result.duration_seconds, 3),
                "finished": result.finished}
    out = {"job": kind, **result}
    out.setdefault("bytes", 0)
    return out


def run_job(kind: str, ctx: Context) -> dict[str, Any]:
    """Run one job (and retention after a backup); returns its summary or raises SaveitError."""
    try:
        fn = JOBS[kind]
    except KeyError:
        raise ConfigError(f"unknown job {kind!r}", hint=f"one of {', '.join(JOBS)}") from None
    summary = summarize(kind, fn(ctx))
    if kind in BACKUP_JOBS:
        from saveit_backup.ops.expire import run_expire

        try:
            expired = run_expire(ctx, dry_run=False)
            summary["expire"] = {"deleted": [d["id"] for d in expired["delete"]], "uncommitted": expired["uncommitted"],
                                 "wal_deleted": expired["wal_deleted"]}
        except SaveitError as exc:
            log.warning("expire after backup %s failed: %s", summary.get("backup_id"), exc)
            summary["expire"] = {"error": exc.to_dict()}
    return summary
