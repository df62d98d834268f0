"""WAL commands: wal-push, wal-fetch (archive/restore_command), wal-receive, async worker and status.

The console entry point (``entry.main``) sends ``wal-push`` and ``wal-fetch`` straight to
``fast_main``, which parses their few options by hand (``wal_args``; argparse only for help and errors) and
loads ``logging`` only with ``--verbose``: PostgreSQL starts one process per WAL file, so every
import counts.  Both routes run the same ``run_push`` / ``run_fetch``.  Handlers import their
dependencies when they run.

    archive_command = 'saveit-backup wal-push %p'            (add --async for the background worker)
    restore_command = 'saveit-backup wal-fetch %f %p'

wal-fetch exit statuses: 0 fetched, 1 not in the archive, otherwise the error's status
(with ``--abort-on-error``: 255, which makes PostgreSQL stop recovery instead of ending it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from saveit_backup.errors import SaveitError, WalNotFound
from saveit_backup.wal_args import DEFAULTS, quick_args

if TYPE_CHECKING:
    import argparse
    from types import SimpleNamespace

    from saveit_backup.compose import Context
    from saveit_backup.config import Settings

    Args = argparse.Namespace | SimpleNamespace

UNEXPECTED_STATUS = 70  # a bug, not "not found": must never be 1 for restore_command
ABORT_STATUS = 255  # > 125: PostgreSQL aborts recovery rather than treating the file as missing


# --- arguments (shared by the fast path and the full parser) ----------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="wal_config", help="TOML config file (env BACKUP_CONFIG)")
    p.add_argument("--repo", dest="wal_repo", help="repository URL (env BACKUP_REPOSITORY)")
    p.add_argument("--verbose", "-v", dest="wal_verbose", action="store_true", help="log each file")


def _add_push(sub: Any) -> None:
    p = sub.add_parser("wal-push", help="archive one WAL file (archive_command = 'saveit-backup wal-push %%p')")
    p.add_argument("path", help="WAL file path (%%p)")
    p.add_argument("--async", dest="async_", action="store_true", default=None,
                   help="hand the file to a background worker that pushes ready files in parallel (env BACKUP_ARCHIVE_ASYNC)")
    p.add_argument("--timeout", type=float, default=DEFAULTS["wal-push"]["timeout"],
                   help="async: seconds to wait for the worker (default 60)")
    _common(p)
    p.set_defaults(handler=cmd_wal_push)


def _add_fetch(sub: Any) -> None:
    p = sub.add_parser("wal-fetch", help="restore one WAL file (restore_command = 'saveit-backup wal-fetch %%f %%p')")
    p.add_argument("name", help="WAL file name (%%f)")
    p.add_argument("dest", help="destination path (%%p)")
    p.add_argument("--prefetch", type=int, default=DEFAULTS["wal-fetch"]["prefetch"],
                   help="also fetch the next N segments into pg_wal/.saveit-prefetch (0: off)")
    p.add_argument("--abort-on-error", action="store_true",
                   help="exit 255 on failures other than 'not found', so PostgreSQL stops recovery instead of ending it")
    _common(p)
    p.set_defaults(handler=cmd_wal_fetch)


def register(sub: Any) -> None:
    """Add this group's parsers to ``sub``."""
    _add_push(sub)
    _add_fetch(sub)

    r = sub.add_parser("wal-receive", help="stream WAL with pg_receivewal through a replication slot into the repository")
    r.add_argument("--slot", default="saveit_backup", help="replication slot (created if missing; default saveit_backup)")
    r.add_argument("--staging", help="local directory for pg_receivewal (default /var/tmp/saveit-receive-SLOT)")
    r.add_argument("--until-segment", help="stop once this segment (or a later one) is stored")
    r.add_argument("--timeout", type=float, help="stop after this many seconds")
    r.set_defaults(handler=cmd_wal_receive)

    w = sub.add_parser("wal-push-worker", help="run the async archiving worker in the foreground")
    w.add_argument("--pg-wal", required=True, help="the cluster's pg_wal directory")
    w.add_argument("--idle-exit", type=float, default=3600.0, help="exit after this many idle seconds")
    w.set_defaults(handler=cmd_wal_push_worker)

    s = sub.add_parser("wal-async-status", help="state of the async archiving spool (queue, errors, dropped segments)")
    s.add_argument("--pg-wal", required=True, help="the cluster's pg_wal directory")
    s.set_defaults(handler=cmd_wal_async_status)


# --- shared bodies ------------------------------------------------------------------------
def _settings(args: Args, ctx: Context | None) -> Settings:
    if ctx is not None and not (args.wal_config or args.wal_repo):
        return ctx.settings
    from saveit_backup import config

    return config.load({"repository": args.wal_repo or getattr(args, "repo", None)},
                       config_file=args.wal_config or getattr(args, "config", None))


def run_push(args: Args, ctx: Context | None, waited_since: float | None = None) -> int:
    """``waited_since``: see ``wal_spool.FastAck``."""
    settings = _settings(args, ctx)
    _log_format(settings)
    use_async = settings.archive_async if args.async_ is None else args.async_
    if use_async:
        from saveit_backup.ops.wal_spool import push_async

        outcome = push_async(settings, args.path, args.timeout, {"repository": args.wal_repo or getattr(args, "repo", None)},
                             args.wal_config or getattr(args, "config", None), waited_since)
        _info("%s: %s (async)", os.path.basename(args.path), outcome)
        return 0
    from saveit_backup.ops.wal_cache import clean_prefetch
    from saveit_backup.ops.wal_push import open_repo, push_file

    result = push_file(open_repo(settings, serial=True), args.path)
    _info("%s: %s, %d -> %d bytes, %.0f ms", result.name, result.status, result.plain_size, result.stored_size,
             result.seconds * 1000)
    clean_prefetch(os.path.dirname(os.path.abspath(args.path)))
    return 0


def run_fetch(args: Args, ctx: Context | None) -> int:
    """Never exits 1 except for 'not in the archive'."""
    try:
        from saveit_backup.ops.wal_cache import take_cached

        if take_cached(args.name, args.dest):  # served from the prefetch cache: no configuration needed
            return 0
        settings = _settings(args, ctx)
        _log_format(settings)
        from saveit_backup.ops.wal_fetch import fetch
        from saveit_backup.ops.wal_push import open_repo

        result = fetch(open_repo(settings), args.name, args.dest, args.prefetch)
        _info("%s: from %s, %d prefetched", result.name, result.source, result.prefetched)
        return 0
    except WalNotFound as exc:
        _info("%s", exc.message)
        return exc.exit_status
    except SaveitError as exc:
        print(f"saveit-backup: error {exc}", file=sys.stderr)
        return ABORT_STATUS if args.abort_on_error else (exc.exit_status if exc.exit_status != 1 else UNEXPECTED_STATUS)
    except Exception:
        import traceback

        traceback.print_exc()
        return ABORT_STATUS if args.abort_on_error else UNEXPECTED_STATUS


# --- handlers for the full parser ---------------------------------------------------------
def cmd_wal_push(args: argparse.Namespace, ctx: Context) -> int:
    return run_push(args, ctx)


def cmd_wal_fetch(args: argparse.Namespace, ctx: Context) -> int:
    return run_fetch(args, ctx)


def cmd_wal_receive(args: argparse.Namespace, ctx: Context) -> int:
    from saveit_backup.ops.wal_receive import receive

    stats = receive(ctx.settings, args.slot, args.staging, args.until_segment, args.timeout)
    if getattr(args, "json", False):
        import json

        print(json.dumps({"stored": stats.stored, "existing": stats.existing, "last": stats.last, "files": stats.names,
                          "restarts": stats.restarts}))
    else:
        print(f"wal-receive: {stats.stored} stored, {stats.existing} already archived, last segment {stats.last or '-'}")
    return 0


def cmd_wal_push_worker(args: argparse.Namespace, ctx: Context) -> int:
    import signal

    from saveit_backup.ops.wal_async import Spool, Worker

    pg_wal = os.path.abspath(args.pg_wal)
    worker = Worker(ctx.settings, Spool.for_cluster(ctx.settings, pg_wal), pg_wal, max(2, ctx.settings.jobs * 2), args.idle_exit)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    return worker.run()


def cmd_wal_async_status(args: argparse.Namespace, ctx: Context) -> int:
    import json

    from saveit_backup.ops.wal_async import status

    print(json.dumps(status(ctx.settings, os.path.abspath(args.pg_wal)), indent=1))
    return 0


# --- fast path ------------------------------------------------------------------------------
def _info(msg: str, *args: object) -> None:
    """An INFO line if logging is in use (the CLI, or --verbose); otherwise nobody would show it."""
    if "logging" in sys.modules:
        import logging

        logging.getLogger("saveit_backup.wal").info(msg, *args)


def _log_format(settings: Settings) -> None:
    if settings.log_format == "json" and "logging" in sys.modules:
        import logging

        from saveit_backup.logs import JsonFormatter

        for handler in logging.getLogger("saveit_backup").handlers:
            handler.setFormatter(JsonFormatter())


def _parse_with_argparse(argv: Sequence[str]) -> argparse.Namespace:
    import argparse

    parser = argparse.ArgumentParser(prog="saveit-backup")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_push(sub)
    _add_fetch(sub)
    return parser.parse_args(list(argv))


def fast_main(argv: Sequence[str], waited_since: float | None = None) -> int:
    """``wal-push`` / ``wal-fetch`` without the full parser or other commands' imports."""
    args: Args | None = quick_args(argv)
    if args is None:
        args = _parse_with_argparse(argv)
    if args.wal_verbose:
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ"))
        root = logging.getLogger("saveit_backup")
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
    if args.command == "wal-fetch":
        return run_fetch(args, None)
    try:
        return run_push(args, None, waited_since)
    except SaveitError as exc:
        print(f"saveit-backup: error {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
