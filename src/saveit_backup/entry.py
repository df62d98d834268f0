"""Console entry point ``saveit-backup``.

PostgreSQL runs ``wal-push`` / ``wal-fetch`` once per WAL file, so those two go straight to
``cli_wal.fast_main`` without importing the full command line (argparse, logging, every command).
"""

from __future__ import annotations

import sys

FAST_COMMANDS = ("wal-push", "wal-fetch")


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["wal-push"]:
        import os

        from saveit_backup.ops.wal_spool import acknowledged
        from saveit_backup.wal_args import quick_args

        ack = acknowledged(quick_args(argv), os.environ)  # async mode, pushed by the worker: nothing else to load
        if ack.done:
            status = 0
        else:
            from saveit_backup.cli_wal import fast_main

            status = fast_main(argv, ack.waited_since)
        # Leave without the interpreter's teardown, about 4 ms of every archive_command (measured
        # here): a push leaves no thread running and no file open, only stdio to flush.
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # closed by the caller: nothing to say there
                pass
        os._exit(status)
    if argv and argv[0] in FAST_COMMANDS:
        from saveit_backup.cli_wal import fast_main

        return fast_main(argv)
    from saveit_backup.cli import main as cli_main

    return cli_main(argv)
