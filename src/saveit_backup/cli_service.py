"""The service's commands: ``serve``, ``status``, ``restore-test`` (registered by cli.py)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saveit_backup.compose import Context


def register(sub: Any) -> None:
    """Add this group's parsers to ``sub``."""
    s = sub.add_parser("serve", help="run the scheduler with health, metrics and status endpoints",
                       description="Cron schedules are UTC: 5 fields, or 6 with SECONDS FIRST ('*/5 * * * * *').")
    s.add_argument("--grace", type=float, default=60.0, metavar="SECONDS",
                   help="on SIGTERM, let a running job finish for this long before aborting it (default 60)")
    s.add_argument("--refresh", type=float, default=30.0, metavar="SECONDS",
                   help="how often status and metrics re-read the repository (default 30)")
    s.add_argument("--retry-base", type=float, default=30.0, metavar="SECONDS", help="first retry delay after a failure (default 30)")
    s.add_argument("--retry-cap", type=float, default=600.0, metavar="SECONDS", help="longest retry delay (default 600)")
    s.add_argument("--retry-attempts", type=int, default=5, metavar="N", help="runs per scheduled slot at most (default 5)")
    s.set_defaults(handler=cmd_serve)

    st = sub.add_parser("status", help="last backups, WAL lag, PITR window, next runs, RPO/RTO met or breached")
    st.add_argument("--json", dest="status_json", action="store_true", help="machine-readable output")
    st.add_argument("--check", action="store_true", help="exit 1 when an objective is breached")
    st.set_defaults(handler=cmd_status)

    rt = sub.add_parser("restore-test", help="restore the newest logical backup into a scratch database, check it, drop it")
    rt.add_argument("--keep", action="store_true", help="keep the scratch database for inspection")
    rt.add_argument("--json", dest="status_json", action="store_true", help="machine-readable output")
    rt.set_defaults(handler=cmd_restore_test)


def cmd_serve(args: argparse.Namespace, ctx: Context) -> int:
    from saveit_backup.errors import ConfigError
    from saveit_backup.service.loops import Service, ServiceOptions
    from saveit_backup.service.scheduler import Backoff

    if args.grace < 0 or args.refresh <= 0 or args.retry_base <= 0 or args.retry_attempts < 1:
        raise ConfigError("--grace must be >= 0, --refresh and --retry-base > 0, --retry-attempts >= 1")
    options = ServiceOptions(grace=args.grace, refresh=args.refresh, verbose=args.verbose,
                             backoff=Backoff(base=args.retry_base, cap=max(args.retry_cap, args.retry_base),
                                             max_attempts=args.retry_attempts))
    return Service(ctx.settings, options).run()


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    from saveit_backup.domain.manifest import utcnow
    from saveit_backup.ops.status import build_status, gather, render_text

    report = build_status(gather(ctx), ctx.settings, utcnow())
    if args.json or args.status_json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(render_text(report))
    if args.check and any(o["status"] == "breached" for o in report["objectives"].values()):
        return 1
    return 0


def cmd_restore_test(args: argparse.Namespace, ctx: Context) -> int:
    from saveit_backup.ops.restore_test import run_restore_test

    result = run_restore_test(ctx, keep=args.keep)
    if args.json or args.status_json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    print(f"restore test of backup {result['backup_id']}: ok in {result['duration_seconds']:.1f} s "
          f"(scratch database {result['scratch_database']}{', kept' if result['kept'] else ', dropped'})")
    for t in result["tables"]:
        print(f"  {t['table']:<40} {t['expected']:>12} rows  {'ok' if t['ok'] else 'MISMATCH'}")
    for q in result["sample_queries"]:
        print(f"  {q['query']}: {q['rows']} row(s)")
    return 0
