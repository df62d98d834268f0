"""Run one job in a child process, so that shutdown can abort it.

Each job runs in ``python -m saveit_backup.service.worker JOB`` in its own session (process
group): aborting kills the worker and the PostgreSQL tools it started together.  When ``stop``
is set the job gets ``grace`` seconds to finish; then the group gets SIGTERM (the worker raises
``Interrupted``, releases the repository lock and exits), and SIGKILL ``kill_after`` seconds
later.  A backup's manifest is its commit marker, so an aborted backup is never visible.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from saveit_backup.config import Settings

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    job: str
    ok: bool
    duration_seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    aborted: bool = False
    exit_status: int = 0


@dataclass
class JobRunner:
    settings: Settings
    verbose: bool = False
    kill_after: float = 5.0
    python: str = sys.executable
    poll: float = 0.2

    def run(self, job: str, stop: threading.Event, grace: float) -> RunResult:
        body = json.dumps({"values": dict(self.settings.values), "sources": dict(self.settings.sources),
                           "verbose": self.verbose}).encode()
        t0 = time.monotonic()
        proc = subprocess.Popen([self.python, "-m", "saveit_backup.service.worker", job], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None, start_new_session=True)
        stop_seen: float | None = None
        termed: float | None = None
        out = b""
        pending: bytes | None = body
        while True:
            try:
                out, _ = proc.communicate(input=pending, timeout=self.poll)
                break
            except subprocess.TimeoutExpired:
                pending = None  # sent (communicate keeps feeding it); passing it again is refused
            if stop.is_set():
                now = time.monotonic()
                if stop_seen is None:
                    stop_seen = now
                    log.warning("shutdown: waiting up to %.0f s for job %s (pid %d) to finish", grace, job, proc.pid)
                if termed is None and now - stop_seen >= grace:
                    log.warning("shutdown: grace period over, aborting job %s (pid %d)", job, proc.pid)
                    self._signal(proc, signal.SIGTERM)
                    termed = now
                elif termed is not None and now - termed >= self.kill_after:
                    log.error("job %s (pid %d) did not stop after SIGTERM: killing it", job, proc.pid)
                    self._signal(proc, signal.SIGKILL)
        # the worker's children (pg_dump...) share its process group: make sure none outlives it
        self._signal(proc, signal.SIGKILL)
        duration = time.monotonic() - t0
        aborted = termed is not None
        parsed = _last_json(out)
        if parsed is None:
            error = {"code": "", "message": f"job process exited {proc.returncode} without a result", "hint": "",
                     "kind": "WorkerDied"}
            return RunResult(job, False, duration, error=error, aborted=aborted, exit_status=proc.returncode or 1)
        if parsed.get("ok"):
            return RunResult(job, True, duration, summary=parsed.get("summary") or {}, exit_status=0)
        return RunResult(job, False, duration, error=parsed.get("error"), aborted=aborted, exit_status=proc.returncode)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _last_json(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out.decode(errors="replace").strip().splitlines()):
        try:
            body = json.loads(line)
        except ValueError:
            continue
        if isinstance(body, dict):
            return body
    return None
