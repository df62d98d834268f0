"""Physical backups, physical restore and WAL continuity reports (issue: physical backups).

``backup --type full`` runs in local mode (``--pgdata DIR`` / BACKUP_PGDATA: files read between
pg_backup_start and pg_backup_stop) or remote mode (``--remote`` / BACKUP_PHYSICAL_MODE=remote:
pg_basebackup over the replication protocol); ``--type diff|incr`` likewise (block deltas locally,
``pg_basebackup --incremental`` remotely on PostgreSQL 17+).  ``restore --target-dir`` restores one and sets up
point-in-time recovery (ops/physical_restore.py); ``verify --wal`` checks archive continuity.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from saveit_backup.errors import ConfigError

if TYPE_CHECKING:
    from saveit_backup.compose import Context
    from saveit_backup.domain.manifest import Manifest
    from saveit_backup.domain.pitr import RecoveryTarget
    from saveit_backup.ops.progress import Progress


def register(sub: Any) -> None:
    """Physical options live on the shared backup/restore parsers; add the few that only physical backups have."""
    backup = sub.choices.get("backup")
    if backup is not None:
        backup.add_argument("--no-verify-checksums", action="store_true",
                            help="full, local mode: do not check data page checksums while reading (saves CPU)")
        backup.add_argument("--wal-timeout", type=float, default=None,
                            help="full/diff/incr: seconds to wait for the backup's WAL to be archived (default 300)")


def physical_backup(args: argparse.Namespace, ctx: Context, progress: Progress) -> Manifest:
    import sys

    from saveit_backup.ops.physical import WAL_TIMEOUT, PhysicalOptions, backup_physical

    settings = ctx.settings
    if args.remote:
        mode = "remote"
    elif args.pgdata or (settings.pgdata and settings.physical_mode != "remote"):
        mode = "local"
    elif settings.physical_mode == "remote":
        mode = "remote"
    else:
        raise ConfigError(f"backup --type {args.type} needs --pgdata DIR (local mode, on the database host) or --remote "
                          "(replication protocol)", hint="or set BACKUP_PGDATA / BACKUP_PHYSICAL_MODE=remote")
    opts = PhysicalOptions(mode=mode, pgdata=str(args.pgdata or settings.pgdata), jobs=max(1, int(settings.jobs)),
                           verify_checksums=not getattr(args, "no_verify_checksums", False),
                           wal_timeout=getattr(args, "wal_timeout", None) or WAL_TIMEOUT, kind=args.type,
                           page_xor=settings.page_xor)
    manifest = backup_physical(ctx, opts, progress)
    if manifest.options.get("fallback"):
        print(f"WARNING: backup --type {args.type}: {manifest.options['fallback']}; took a full backup instead",
              file=sys.stderr)
    return manifest


def recovery_target(args: argparse.Namespace) -> RecoveryTarget:
    from saveit_backup.domain.pitr import RecoveryTarget

    given = [f for f in ("time", "lsn", "xid", "name") if getattr(args, f, None)] + (["immediate"] if args.immediate else [])
    if len(given) > 1:
        raise ConfigError(f"choose one recovery target, not {' and '.join('--' + g for g in given)}")
    try:
        if args.time:
            when = datetime.fromisoformat(args.time.strip().replace(" UTC", "+00:00"))
            if when.tzinfo is None:
                raise ConfigError(f"--time {args.time!r} has no time zone", hint="add one, e.g. 2026-11-25T01:45:00Z or +01:00")
            return RecoveryTarget.at_time(when.astimezone(UTC))
        if args.lsn:
            return RecoveryTarget.at_lsn(args.lsn)
        if args.xid:
            return RecoveryTarget.at_xid(int(args.xid))
        if args.name:
            return RecoveryTarget.at_name(args.name)
        if args.immediate:
            return RecoveryTarget.immediate()
        return RecoveryTarget.latest()
    except ValueError as exc:
        raise ConfigError(f"invalid recovery target: {exc}") from None


def physical_restore(args: argparse.Namespace, ctx: Context, progress: Progress) -> int:
    from saveit_backup.ops.physical_restore import RestoreRequest, restore_physical

    timeline = str(args.timeline or "latest")
    if not (timeline in ("latest", "current") or timeline.isdigit()):
        raise ConfigError(f"--timeline {timeline!r}: use 'latest', 'current' or a number")
    req = RestoreRequest(backup=args.id or "latest", target_dir=args.target_dir, target=recovery_target(args), timeline=timeline,
                         action=args.target_action, start=args.start, force=args.force, delta=args.delta, port=args.port,
                         jobs=args.jobs or ctx.settings.jobs, config_file=args.config or os.environ.get("BACKUP_CONFIG"),
                         archive_mode=args.archive_mode)
    report = restore_physical(ctx, req, progress)
    body = report.to_dict()
    if args.json:
        print(json.dumps(body, indent=1, default=str))
        return 0
    if args.quiet:
        return 0
    print(f"restored backup {report.backup_id} into {report.target_dir}: {report.files} files, {report.bytes} bytes"
          + (f" ({report.skipped} unchanged)" if report.skipped else ""))
    for ts in report.tablespaces:
        print(f"  tablespace {ts['oid']} -> {ts['location']}")
    print(f"recovery target: {report.target}; timeline {timeline}; action {args.target_action}")
    print("restore_command fetches WAL with this program: the server needs the repository's credentials and "
          "encryption keys in its environment (or BACKUP_CONFIG)")
    if report.started:
        r = report.reached
        print(f"server started on port {report.port} (socket {report.socket_dir}), log {report.log_file}")
        print(f"recovery {r.get('state')}: last transaction {r.get('last_transaction_time') or '-'}, "
              f"LSN {r.get('replay_lsn') or r.get('min_recovery_lsn') or '-'}, timeline {r.get('timeline')}")
    else:
        print(f"start it with: pg_ctl -D {report.target_dir} start")
    return 0


def wal_report(ctx: Context, manifests: list[Manifest]) -> dict[str, Any]:
    from saveit_backup.ops.wal_check import wal_report as report

    return report(ctx.repo, manifests)
