"""Console entry point ``saveit-backup``.

PostgreSQL runs ``wal-push`` / ``wal-fetch`` once per WAL file, so those two go straight to
``cli_wal.fast_main`` without importing the full command line (argparse, logging, every command).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing costs milliseconds of every archive_command; mypy still reads this block
if TYPE_CHECKING:
    from typing import NoReturn


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["wal-push"]:
        import os

        from saveit_backup.wal_args import async_requested, quick_args

        args = quick_args(argv)
        waited_since = None
        if async_requested(args, os.environ):  # a sync push does not load the spool
            from saveit_backup.ops.wal_spool import acknowledged

            ack = acknowledged(args, os.environ)  # pushed by the worker: nothing else to load
            if ack.done:
                _leave(0)
            waited_since = ack.waited_since
        from saveit_backup.cli_wal import fast_main

        _leave(fast_main(argv, waited_since))
    if argv[:1] == ["wal-fetch"]:
        from saveit_backup.ops.wal_cache import take_cached
        from saveit_backup.wal_args import quick_args

        args = quick_args(argv)
        if args is not None and take_cached(args.name, args.dest):  # prefetched: most calls of a recovery
            _leave(0)
        from saveit_backup.cli_wal import fast_main

        _leave(fast_main(argv))
    from saveit_backup.cli import main as cli_main

    return cli_main(argv)


def _leave(status: int) -> NoReturn:
    """Exit without the interpreter's teardown, about 4 ms of every archive_command and
    restore_command (measured here): wal-push and wal-fetch leave no thread running (fetch waits
    for its prefetches) and no file open, only stdio to flush."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed by the caller: nothing to say there
            pass
    os._exit(status)
