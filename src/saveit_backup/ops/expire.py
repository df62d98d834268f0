"""Apply retention: plan with the pure planner, then delete (manifest first, then WAL)."""

from __future__ import annotations

import logging
from typing import Any

from saveit_backup.compose import Context
from saveit_backup.domain.manifest import utcnow
from saveit_backup.domain.retention import BackupRecord, RetentionPolicy, WalRecord, plan
from saveit_backup.repo import layout

log = logging.getLogger(__name__)


def policy_from(ctx: Context, keep_daily: int | None = None, keep_weekly: int | None = None,
                keep_monthly: int | None = None) -> RetentionPolicy:
    s = ctx.settings
    return RetentionPolicy(full_days=s.retention_days, incremental_days=s.incremental_retention_days,
                           logical_days=s.retention_days, keep_count=s.retention_count or None,
                           keep_daily=keep_daily, keep_weekly=keep_weekly, keep_monthly=keep_monthly,
                           wal_days=s.wal_retention_days)


def run_expire(ctx: Context, dry_run: bool, keep_daily: int | None = None, keep_weekly: int | None = None,
               keep_monthly: int | None = None) -> dict[str, Any]:
    repo = ctx.repo
    repo.load_config()
    with repo.lock("expire"):
        manifests = repo.manifests()
        pinned = repo.pinned_ids()
        records = [
            BackupRecord(id=m.id, kind=m.type, started=m.started_at, finished=m.finished_at,  # type: ignore[arg-type]
                         good=m.checksum_ok, parent_id=m.parent, pinned=m.id in pinned,
                         start_wal=m.physical.get("start_wal"), stop_wal=m.physical.get("stop_wal"),
                         timeline=m.physical.get("timeline"))
            for m in manifests
        ]
        wal_keys = {info.key.rsplit("/", 1)[1]: info.key for info in repo.storage.list(layout.WAL)}
        result = plan(records, policy_from(ctx, keep_daily, keep_weekly, keep_monthly), utcnow(),
                      [WalRecord(name) for name in wal_keys])
        uncommitted = repo.backup_ids()[1]
        out: dict[str, Any] = {
            "dry_run": dry_run,
            "delete": [{"id": i, "reason": r} for i, r in result.delete],
            "keep": [{"id": i, "reason": r} for i, r in result.keep],
            "uncommitted": uncommitted,
            "wal_deleted": len(result.wal_delete),
            "wal_reasons": {str(k): v for k, v in result.wal_reasons.items()},
        }
        if not dry_run:
            for backup_id, reason in result.delete:
                log.info("expire: deleting backup %s: %s", backup_id, reason)
                repo.delete_backup(backup_id)
            for backup_id in uncommitted:
                log.info("expire: deleting uncommitted leftovers of %s", backup_id)
                repo.delete_uncommitted(backup_id)
            for name in result.wal_delete:
                repo.storage.delete(wal_keys[name])
            if result.wal_delete:
                log.info("expire: deleted %d WAL file(s) older than the point-in-time window", len(result.wal_delete))
        return out
