"""Child process of the service: runs one job and reports on stdout.

``python -m saveit_backup.service.worker JOB`` reads the resolved settings as JSON on stdin
(secrets never travel in argv or the environment), runs ``ops.jobs.run_job`` and writes one JSON
line to its stdout: ``{"ok": true, "summary": {...}}`` or ``{"ok": false, "error": {...}}``.
Logs go to stderr (the service's).  SIGTERM raises ``Interrupted`` inside the job, so locks are
released and the pipeline stops; a job stuck in a long C call is ended ``ABORT_AFTER`` seconds later
regardless.  Whatever was written stays uncommitted (no manifest) for ``expire`` to remove.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

ABORT_AFTER = 2.0  # seconds between SIGTERM and a forced exit when the job cannot unwind in time
INTERRUPTED = {"code": "SVB-900", "message": "job aborted by service shutdown", "kind": "Interrupted",
               "hint": "the job was interrupted; nothing half-finished is visible"}


class _Reporter:
    """Writes the one result line, once, from whichever thread gets there first."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.done = threading.Event()

    def write(self, result: dict[str, Any]) -> bool:
        with self.lock:
            if self.done.is_set():
                return False
            self.out.write(json.dumps(result, default=str) + "\n")
            self.out.flush()
            self.done.set()
            return True


def _on_term(signum: int, frame: FrameType | None) -> None:
    from saveit_backup.errors import Interrupted

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Interrupted("job aborted by service shutdown")


def _watch_term(read_fd: int, reporter: _Reporter) -> None:
    """Python runs signal handlers only between bytecodes of the main thread, which may sit in one long
    C call (a compressor flushing, a blocking read).  The wakeup fd is written by the C-level handler at
    once: if the job has not unwound ``ABORT_AFTER`` seconds later, report it interrupted and exit.  The
    repository lock left behind names a dead process on this host, so the next job breaks it."""
    while True:
        data = os.read(read_fd, 16)
        if not data or signal.SIGTERM in data:
            break
    if reporter.done.wait(ABORT_AFTER):
        return
    if reporter.write({"ok": False, "error": INTERRUPTED}):
        logging.getLogger("saveit_backup").error("job did not stop within %.0f s of SIGTERM: exiting now", ABORT_AFTER)
        os._exit(130)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _on_term)
    reporter = _Reporter(sys.stdout)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    threading.Thread(target=_watch_term, args=(read_fd, reporter), name="term-watch", daemon=True).start()
    sys.stdout = sys.stderr  # anything a job prints must not mix with the result line
    result: dict[str, Any]
    code = 0
    try:
        from saveit_backup.compose import Context
        from saveit_backup.config import Settings
        from saveit_backup.errors import SaveitError
        from saveit_backup.ops.jobs import run_job

        body = json.loads(sys.stdin.read())
        settings = Settings(body["values"], body["sources"])
        _setup_logging(settings.log_format, body.get("verbose", False))
        try:
            result = {"ok": True, "summary": run_job(args[0], Context(settings))}
        except SaveitError as exc:
            result = {"ok": False, "error": exc.to_dict()}
            code = exc.exit_status
    except BaseException as exc:  # an unexpected bug or signal: report it like an error
        logging.getLogger("saveit_backup").exception("job %s crashed", args[:1])
        result = {"ok": False, "error": {"code": "", "message": f"{type(exc).__name__}: {exc}", "hint": "",
                                         "kind": type(exc).__name__}}
        code = 70
    if not reporter.write(result):
        time.sleep(60)  # the watcher reported and is exiting the process
    return code


def _setup_logging(fmt: str, verbose: bool) -> None:
    from saveit_backup.logs import setup

    setup(fmt, logging.DEBUG if verbose else logging.INFO, "[job] ")


if __name__ == "__main__":
    sys.exit(main())
