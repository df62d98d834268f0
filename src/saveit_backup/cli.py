"""Command line: argument parsing to ops, output formatting, exit statuses.

Imports stay lazy: ``wal-push`` must start fast, so each command imports what
it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from saveit_backup.errors import SaveitError
from saveit_backup.units import human_bytes

if TYPE_CHECKING:
    from saveit_backup.compose import Context

log = logging.getLogger("saveit_backup")
Handler = Callable[[argparse.Namespace, "Context"], int]


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    elif not args.quiet or text.startswith("WARNING"):
        print(text)


def _progress(args: argparse.Namespace) -> Any:
    from saveit_backup.ops.progress import Progress

    return Progress(enabled=not (args.quiet or args.json))


# --- commands -------------------------------------------------------------------
def cmd_backup(args: argparse.Namespace, ctx: Context) -> int:
    if args.type != "logical":
        from saveit_backup.cli_physical import physical_backup

        manifest = physical_backup(args, ctx, _progress(args))
    else:
        from saveit_backup.ops.logical import Selection, backup_logical

        selection = Selection(args.table or (), args.schema or (), args.exclude_table or (), args.all_databases)
        manifest = backup_logical(ctx, selection, _progress(args))
    _emit(args, manifest.to_dict(),
          f"backup {manifest.id} ({manifest.type}) committed: {len(manifest.objects)} objects, "
          f"{human_bytes(manifest.plain_bytes)} read, {human_bytes(manifest.stored_bytes)} stored, "
          f"{manifest.duration_seconds:.1f} s, encryption {manifest.encryption}")
    return 0


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    repo = ctx.repo
    config = repo.load_config()
    manifests = repo.manifests()
    rows: list[dict[str, Any]] = []
    for m in manifests:
        status = "ok" if m.checksum_ok else "damaged"
        rows.append({"id": m.id, "type": m.type, "started": m.started, "duration_seconds": round(m.duration_seconds, 1),
                     "plain_bytes": m.plain_bytes, "stored_bytes": m.stored_bytes, "database": m.database,
                     "environment": m.environment, "encryption": m.encryption, "status": status, "parent": m.parent})
    if args.json:
        print(json.dumps({"repository": ctx.settings.repository_url, "encryption": config.cipher, "backups": rows}, indent=1))
        return 0
    enc = "UNENCRYPTED" if not config.encrypted else f"encrypted ({config.cipher})"
    print(f"repository {ctx.settings.repository_url}: {len(rows)} backup(s), {enc}")
    if rows:
        header = f"{'ID':<18} {'TYPE':<8} {'STARTED (UTC)':<20} {'DURATION':>9} {'SIZE':>11} {'DATABASE':<16} STATUS"
        print(header)
        for r in rows:
            print(f"{r['id']:<18} {r['type']:<8} {r['started'][:19].replace('T', ' '):<20} {r['duration_seconds']:>8.1f}s "
                  f"{human_bytes(r['stored_bytes']):>11} {r['database'][:16]:<16} {r['status']}")
    return 0


def cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    ctx.repo.load_config()
    m = ctx.repo.resolve(args.id)
    body = m.to_dict()
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    print(f"backup {m.id}: {m.type}, database {m.database}, PostgreSQL {m.pg_version}, environment {m.environment or '-'}")
    print(f"  started {m.started}, finished {m.finished} ({m.duration_seconds:.1f} s), encryption {m.encryption}")
    print(f"  {human_bytes(m.plain_bytes)} read, {human_bytes(m.stored_bytes)} stored, manifest checksum "
          f"{'ok' if m.checksum_ok else 'MISMATCH'}")
    if m.parent:
        print(f"  depends on {m.parent}")
    from saveit_backup.pipeline import digests

    for o in m.objects:
        print(f"  object {o.name}: {o.size} bytes plain, {o.stored_size} stored, {o.codec}/{o.cipher}, {digests.short(o.digest)}")
    for t in m.tables:
        print(f"  table {t.database}.{t.qualified}: {t.rows} rows")
    return 0


def cmd_verify(args: argparse.Namespace, ctx: Context) -> int:
    from saveit_backup.ops.verify import verify_backup

    repo = ctx.repo
    repo.load_config()
    targets = repo.manifests() if args.all or not args.id else [repo.resolve(args.id)]
    if not args.all and not args.id:
        targets = targets[-1:]
    reports = [verify_backup(repo, m, ctx.settings.jobs) for m in targets]
    extra: dict[str, Any] = {}
    if (args.all and any(m.type in ("full", "diff", "incr") for m in targets)) or args.wal:
        from saveit_backup.cli_physical import wal_report

        extra = wal_report(ctx, targets)
    failed = [r.backup_id for r in reports if not r.ok] + (["wal"] if extra.get("problems") else [])
    if args.json:
        print(json.dumps({"backups": [{"id": r.backup_id, "objects": r.checked, "ok": r.ok, "problems": r.problems}
                                      for r in reports], **extra}, indent=1))
    else:
        for r in reports:
            print(f"{r.backup_id}: {'ok' if r.ok else 'FAILED'} ({r.checked} objects checked)")
            for p in r.problems:
                print(f"  CORRUPT/MISSING {p}")
        for line in extra.get("lines", []):
            print(line)
    if failed:
        from saveit_backup.errors import IntegrityError

        bad = [r.backup_id for r in reports if not r.ok]
        raise IntegrityError(f"verification failed for {', '.join(bad) or 'the WAL archive'}")
    return 0


def cmd_restore(args: argparse.Namespace, ctx: Context) -> int:
    if args.target_dir:
        from saveit_backup.cli_physical import physical_restore

        return physical_restore(args, ctx, _progress(args))
    if not args.target_db:
        from saveit_backup.errors import ConfigError

        raise ConfigError("restore needs --target-db DSN (logical) or --target-dir DIR (physical)")
    from saveit_backup.config import as_conninfo
    from saveit_backup.ops.logical_restore import RestoreRequest, check_report, restore_logical

    req = RestoreRequest(args.id, as_conninfo(args.target_db), args.table or (), args.schema or (), args.create, args.clean,
                         args.jobs or ctx.settings.jobs, args.no_fallback, args.database, args.no_owner,
                         args.allow_environment_mismatch, not args.no_snapshot)
    report = restore_logical(ctx, req, _progress(args))
    rows = [{"table": t.table, "backup_rows": t.expected, "restored_rows": t.restored, "ok": t.ok} for t in report.tables]
    if args.json:
        print(json.dumps({"backup": report.backup_id, "target": report.target, "snapshot": report.snapshot_id, "tables": rows,
                          "ok": report.ok}, indent=1))
    else:
        print(f"restored backup {report.backup_id} into {report.target}")
        if report.snapshot_id:
            print(f"the target's previous state is backup {report.snapshot_id}")
        print(f"{'TABLE':<40} {'BACKUP ROWS':>12} {'RESTORED ROWS':>14}  CHECK")
        for t in report.tables:
            print(f"{t.table:<40} {t.expected:>12} {t.restored if t.restored is not None else '-':>14}  {'ok' if t.ok else 'MISMATCH'}")
        print(f"row counts: {'all equal' if report.ok else 'MISMATCH'} ({len(report.tables)} tables)")
    check_report(report)
    return 0


def cmd_expire(args: argparse.Namespace, ctx: Context) -> int:
    from saveit_backup.ops.expire import run_expire

    result = run_expire(ctx, dry_run=args.dry_run, keep_daily=args.keep_daily, keep_weekly=args.keep_weekly,
                        keep_monthly=args.keep_monthly)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        for item in result["delete"]:
            print(f"{verb} {item['id']}: {item['reason']}")
        for item in result["keep"]:
            print(f"keep {item['id']}: {item['reason']}")
        for key in result.get("uncommitted", []):
            print(f"{verb} uncommitted leftovers of {key}")
        if result.get("wal_deleted") is not None:
            print(f"{verb} {result['wal_deleted']} WAL file(s)")
    return 0


def cmd_pin(args: argparse.Namespace, ctx: Context) -> int:
    ctx.repo.load_config()
    ctx.repo.pin(args.id, args.pinned)
    _emit(args, {"backup": args.id, "pinned": args.pinned}, f"{'pinned' if args.pinned else 'unpinned'} {args.id}")
    return 0


def cmd_export(args: argparse.Namespace, ctx: Context) -> int:
    from saveit_backup.ops.logical_restore import export_backup

    fmt = args.format or ("sql.gz" if args.file.endswith(".sql.gz") else "dump")
    manifest = export_backup(ctx, args.id, args.file, fmt, args.database, _progress(args))
    _emit(args, {"backup": manifest.id, "file": args.file, "format": fmt}, f"exported {manifest.id} to {args.file} ({fmt})")
    return 0


def cmd_config_show(args: argparse.Namespace, ctx: Context) -> int:
    rows = ctx.settings.shown()
    if args.json:
        print(json.dumps({name: {"env": env, "value": value, "source": src} for name, env, value, src in rows}, indent=1))
    else:
        for name, env, value, src in rows:
            print(f"{name:<28} {env:<36} {value!s:<40} ({src})")
    return 0


def cmd_repo_init(args: argparse.Namespace, ctx: Context) -> int:
    config = ctx.repo.init(exist_ok=args.exist_ok)
    _emit(args, {"repository": ctx.settings.repository_url, "repository_id": config.repository_id, "cipher": config.cipher},
          f"repository {ctx.settings.repository_url} ready (id {config.repository_id}, encryption {config.cipher})")
    return 0


def cmd_key_generate(args: argparse.Namespace, ctx: Context) -> int:
    import os

    from saveit_backup.pipeline.crypto import generate_identity

    text, public = generate_identity()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    _emit(args, {"identity_file": args.out, "public_key": public}, public)
    return 0


# --- parser -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saveit-backup", description="PostgreSQL backup and restore")
    p.add_argument("--repo", help="repository URL (file:///path, s3://bucket/prefix); env BACKUP_REPOSITORY")
    p.add_argument("--config", help="TOML config file; env BACKUP_CONFIG")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="only errors")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--dbname", "-d", help="database connection (DSN or URL); env DATABASE_URL or PG* variables")
    p.add_argument("--log-format", choices=["text", "json"], help="log format on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("backup", help="take a backup")
    b.add_argument("--type", choices=["logical", "full", "diff", "incr"], default="logical")
    b.add_argument("--table", "-t", action="append", help="only this table (pattern; repeatable)")
    b.add_argument("--schema", "-n", action="append", help="only this schema (repeatable)")
    b.add_argument("--exclude-table", "-T", action="append", help="not this table (repeatable)")
    b.add_argument("--all-databases", action="store_true", help="every database plus globals (roles, tablespaces)")
    b.add_argument("--pgdata", help="data directory (local physical mode)")
    b.add_argument("--remote", action="store_true", help="physical backup over the replication protocol")
    b.add_argument("--jobs", "-j", type=int, help="parallel workers")
    b.add_argument("--dbname", "-d", dest="sub_dbname", help="database connection (same as the global --dbname)")
    b.set_defaults(handler=cmd_backup)

    ls = sub.add_parser("list", help="list backups")
    ls.set_defaults(handler=cmd_list)

    sh = sub.add_parser("show", help="show one backup's manifest")
    sh.add_argument("id", help="backup ID or 'latest'")
    sh.set_defaults(handler=cmd_show)

    v = sub.add_parser("verify", help="re-read objects and check sizes and checksums")
    v.add_argument("id", nargs="?", help="backup ID or 'latest' (default: latest)")
    v.add_argument("--all", action="store_true", help="every backup")
    v.add_argument("--wal", action="store_true", help="also check WAL continuity")
    v.set_defaults(handler=cmd_verify)

    r = sub.add_parser("restore", help="restore a backup")
    r.add_argument("id", nargs="?", default="latest", help="backup ID or 'latest'")
    r.add_argument("--target-db", help="target database DSN (logical)")
    r.add_argument("--target-dir", help="target data directory (physical)")
    r.add_argument("--table", "-t", action="append", help="only this table (repeatable)")
    r.add_argument("--schema", "-n", action="append", help="only this schema (repeatable)")
    r.add_argument("--database", help="database of an --all-databases backup")
    r.add_argument("--create", action="store_true", help="create the target database if missing")
    r.add_argument("--clean", action="store_true", help="drop restored objects first (allows a non-empty target)")
    r.add_argument("--jobs", "-j", type=int, help="parallel pg_restore jobs")
    r.add_argument("--no-fallback", action="store_true", help="with 'latest': fail instead of using an older good backup")
    r.add_argument("--no-owner", action="store_true", help="do not restore ownership and privileges")
    r.add_argument("--no-snapshot", action="store_true", help="with --clean: skip the backup of the target taken first")
    r.add_argument("--allow-environment-mismatch", action="store_true", help="restore a backup from another BACKUP_ENVIRONMENT")
    for flag in ("--time", "--lsn", "--xid", "--name"):
        r.add_argument(flag, help="point-in-time recovery target (physical)")
    r.add_argument("--immediate", action="store_true", help="stop at the end of the backup (physical)")
    r.add_argument("--timeline", default="latest", help="recovery target timeline (physical)")
    r.add_argument("--target-action", choices=["promote", "pause", "shutdown"], default="promote")
    r.add_argument("--start", action="store_true", help="start the restored server and wait for recovery (physical)")
    r.add_argument("--delta", action="store_true", help="rewrite only files that differ (physical)")
    r.add_argument("--force", action="store_true", help="allow a non-empty target directory (physical)")
    r.add_argument("--port", type=int, help="port for --start (physical)")
    r.add_argument("--archive-mode", choices=["preserve", "off"], default="preserve",
                   help="off: the restored server does not archive WAL (a copy for tests or inspection; physical)")
    r.set_defaults(handler=cmd_restore)

    e = sub.add_parser("expire", help="apply retention")
    e.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    e.add_argument("--keep-daily", type=int)
    e.add_argument("--keep-weekly", type=int)
    e.add_argument("--keep-monthly", type=int)
    e.set_defaults(handler=cmd_expire)

    for name, pinned in (("pin", True), ("unpin", False)):
        pp = sub.add_parser(name, help="keep a backup forever" if pinned else "let retention decide again")
        pp.add_argument("id", help="backup ID")
        pp.set_defaults(handler=cmd_pin, pinned=pinned)

    x = sub.add_parser("export", help="write a backup as a file standard tools read")
    x.add_argument("id", help="backup ID or 'latest'")
    x.add_argument("file")
    x.add_argument("--format", choices=["dump", "sql.gz"], help="dump (pg_restore) or sql.gz (gunzip -c | psql)")
    x.add_argument("--database", help="database of an --all-databases backup, or 'globals'")
    x.set_defaults(handler=cmd_export)

    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="effective settings (secrets masked)")
    cs.set_defaults(handler=cmd_config_show)

    rp = sub.add_parser("repo", help="repository")
    rsub = rp.add_subparsers(dest="repo_command", required=True)
    ri = rsub.add_parser("init", help="create the repository (encrypted when keys are configured)")
    ri.add_argument("--exist-ok", action="store_true")
    ri.set_defaults(handler=cmd_repo_init)

    k = sub.add_parser("key", help="encryption keys")
    ksub = k.add_subparsers(dest="key_command", required=True)
    kg = ksub.add_parser("generate", help="write a new identity file and print its public key")
    kg.add_argument("--out", required=True, help="identity file to create (mode 0600)")
    kg.set_defaults(handler=cmd_key_generate)

    import importlib

    for module in EXTRA_COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


# Command groups that live with their feature; each module's register(subparsers) adds
# parsers only (handlers import their dependencies when they run).
EXTRA_COMMAND_MODULES = ("saveit_backup.cli_physical", "saveit_backup.cli_wal", "saveit_backup.cli_service")


def _setup_logging(args: argparse.Namespace, fmt: str) -> None:
    from saveit_backup.logs import setup

    setup(fmt, logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """The full command line (``entry.main`` sends wal-push/wal-fetch to their fast path first)."""
    args = build_parser().parse_args(argv)
    try:
        from saveit_backup import config
        from saveit_backup.compose import Context

        cli_values = {"repository": args.repo, "dbname": getattr(args, "sub_dbname", None) or args.dbname, "log_format": args.log_format,
                      "jobs": getattr(args, "jobs", None), "pgdata": getattr(args, "pgdata", None)}
        settings = config.load(cli_values, config_file=args.config)
        _setup_logging(args, settings.log_format)
        code: int = args.handler(args, Context(settings))
        return code
    except SaveitError as exc:
        if args.json:
            print(json.dumps({"error": exc.to_dict()}))
        print(f"saveit-backup: error {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("saveit-backup: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
