"""Asynchronous archiving: ``wal-push --async`` and its background worker.

Spool directory (``BACKUP_SPOOL_DIR``, default ``/var/tmp/saveit-spool-<hash of pg_wal>``;
one cluster per spool), mode 0700:

* ``in/<name>``: a push request written by ``wal-push`` (holds the file's absolute path);
* ``status/<name>.ok``: pushed (or dropped: the file then says ``dropped``);
* ``status/<name>.error``: the last push failed (JSON: code, kind, message, hint, exit_status);
  a new ``wal-push`` removes an earlier error and waits for a fresh attempt;
* ``worker.lock`` (flock held by the running worker), ``worker.pid``, ``worker.log``;
* ``dropped_total``: segments dropped by the queue limit since the spool was created, for the
  metric ``saveit_wal_archive_queue_dropped_total``.

The worker pushes every file PostgreSQL has marked ``.ready`` in ``pg_wal/archive_status``
(plus requests) in parallel, ahead of PostgreSQL asking, oldest first, history files before
segments.  ``wal-push --async`` returns 0 once its ``.ok`` exists; an ``.error`` is reported
(and removed, so the next call waits for a fresh attempt).  Status files of names that are no
longer ``.ready`` nor requested are removed by the worker.  The worker exits when idle.

Queue limit (``BACKUP_ARCHIVE_QUEUE_MAX`` > 0): when more segments than that wait to be
pushed, the oldest ones (not ``.history``/``.backup`` files, not those being pushed) are
*dropped*: marked ``.ok`` without being stored, logged as errors and counted.  PostgreSQL then
recycles them instead of filling ``pg_wal`` and stopping the primary.  This trades PITR
coverage (a gap in the archive until the next full backup) for availability, like
pgBackRest's ``archive-push-queue-max``.  Unset (0) means never drop.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from saveit_backup.errors import SaveitError
from saveit_backup.ops.wal_spool import DROPPED, Spool, unlink_missing_ok, write_atomic

__all__ = ["DROPPED", "Spool", "Worker", "status", "worker_main"]

if TYPE_CHECKING:
    from concurrent.futures import Future

    from saveit_backup.config import Settings
    from saveit_backup.ops.wal_push import PushResult
    from saveit_backup.pipeline.envelope import EncodeOptions
    from saveit_backup.repo.repository import Repository

log = logging.getLogger("saveit_backup.wal")

DEFAULT_IDLE_EXIT = 30.0
POLL_SECONDS = 0.01  # how soon a new .ready file or request is seen (a scandir of archive_status: cheap)
ERROR_RETRY_SECONDS = 5.0


# --- worker ----------------------------------------------------------------------------
def _order(name: str) -> tuple[int, str]:
    """PostgreSQL's archive order: timeline history files first, then oldest first."""
    return (0 if name.endswith(".history") else 1, name)


def _scan(spool: Spool, pg_wal: str) -> dict[str, str]:
    """Names waiting to be pushed (ready or requested) -> file path."""
    found: dict[str, str] = {}
    try:
        for entry in os.scandir(os.path.join(pg_wal, "archive_status")):
            if entry.name.endswith(".ready"):
                name = entry.name[: -len(".ready")]
                found[name] = os.path.join(pg_wal, name)
    except FileNotFoundError:
        pass
    for entry in os.scandir(spool.requests):
        if entry.name.endswith(".tmp"):
            continue
        try:
            with open(entry.path) as f:
                found.setdefault(entry.name, f.read().strip())
        except OSError:
            pass
    return found


class Worker:
    def __init__(self, settings: Settings, spool: Spool, pg_wal: str, jobs: int, idle_exit: float, poll: float = POLL_SECONDS) -> None:
        self.settings = settings
        self.spool = spool
        self.pg_wal = pg_wal
        self.jobs = max(1, jobs)  # pushes in flight (storage round trips overlap)
        self.cpu_slots = max(1, min(self.jobs, settings.jobs))  # of which compressing at once: BACKUP_JOBS
        self.idle_exit = idle_exit
        self.poll = poll
        self.queue_max = int(settings.archive_queue_max)
        self.stop = threading.Event()
        self.pushed = 0
        self.dropped = 0

    def run(self) -> int:
        """Push until idle for ``idle_exit`` seconds or stopped; 0 if another worker holds the lock."""
        import fcntl
        self.spool.create()
        lock_fd = os.open(self.spool.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            log.debug("another worker is running for %s", self.spool.root)
            return 0
        try:
            write_atomic(self.spool.pid_path, f"{os.getpid()}\n")
            log.info("async WAL worker started (pid %d, %d jobs, queue max %s) for %s", os.getpid(), self.jobs,
                     self.queue_max or "unlimited", self.pg_wal)
            try:
                self._loop()
            except SaveitError as exc:  # cannot push at all (configuration, repository): tell every waiter
                for name in _scan(self.spool, self.pg_wal):
                    write_atomic(self.spool.error(name), json.dumps(_error_body(exc)))
                raise
            log.info("async WAL worker exiting: %d pushed, %d dropped", self.pushed, self.dropped)
        finally:
            unlink_missing_ok(self.spool.pid_path)
            os.close(lock_fd)
        return 0

    def _loop(self) -> None:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from saveit_backup.ops.wal_push import open_repo, push_file, worker_options

        repo: Repository | None = None
        options: EncodeOptions | None = None
        inflight: dict[str, Future[PushResult]] = {}
        cpu = threading.BoundedSemaphore(self.cpu_slots)
        idle_since = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="wal-push") as pool:
            while True:
                pending, blocked = self._pending(inflight)
                if self.queue_max > 0:
                    pending = self._apply_queue_limit(pending, len(inflight))
                ready = {} if self.stop.is_set() else {n: p for n, p in pending.items() if n not in blocked}
                if ready and repo is None:
                    try:  # the repository may be unreachable: keep applying the queue limit meanwhile
                        repo = open_repo(self.settings)
                        options = worker_options(repo)
                    except SaveitError as exc:
                        log.error("cannot open the repository: %s", exc)
                        for name in ready:
                            write_atomic(self.spool.error(name), json.dumps(_error_body(exc)))
                        repo, ready = None, {}
                for name in sorted(ready, key=_order):
                    if len(inflight) >= self.jobs * 2:
                        break
                    inflight[name] = pool.submit(push_file, repo, ready[name], options, name, cpu)  # type: ignore[arg-type]
                if inflight:
                    # A full queue takes nothing new: rescan only when a push ends (or once a second, for stop).
                    full = len(inflight) >= self.jobs * 2
                    done, _ = wait(list(inflight.values()), timeout=1.0 if full else self.poll, return_when=FIRST_COMPLETED)
                    for name, fut in list(inflight.items()):
                        if fut in done:
                            del inflight[name]
                            self._record(name, fut)
                    idle_since = time.monotonic()
                    continue
                if self.stop.is_set() or self._cluster_gone():
                    return
                if pending:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.idle_exit:
                    return
                self.stop.wait(self.poll)

    def _cluster_gone(self) -> bool:
        """pg_wal of a data directory whose server is stopped: nothing will ask for the results."""
        datadir = os.path.dirname(self.pg_wal)
        return os.path.exists(os.path.join(datadir, "PG_VERSION")) and not os.path.exists(os.path.join(datadir, "postmaster.pid"))

    def _pending(self, inflight: dict[str, Future[PushResult]]) -> tuple[dict[str, str], set[str]]:
        """(names still to push -> path, those among them waiting out an error backoff).

        Also removes status files of names PostgreSQL no longer waits for."""
        candidates = _scan(self.spool, self.pg_wal)
        pending: dict[str, str] = {}
        blocked: set[str] = set()
        now = time.time()
        statuses = {e.name: e for e in os.scandir(self.spool.status) if not e.name.endswith(".tmp")}
        for fname, entry in statuses.items():
            name = fname.rsplit(".", 1)[0]
            if name not in candidates and name not in inflight:
                unlink_missing_ok(entry.path)
        for name, path in candidates.items():
            if name in inflight or f"{name}.ok" in statuses:
                continue
            pending[name] = path
            err = statuses.get(f"{name}.error")
            if err is not None:
                try:
                    if now - err.stat().st_mtime < ERROR_RETRY_SECONDS:
                        blocked.add(name)
                except OSError:
                    pass
        return pending, blocked

    def _apply_queue_limit(self, pending: dict[str, str], inflight: int) -> dict[str, str]:
        """Drop the oldest waiting segments beyond ``queue_max`` (see the module docstring)."""
        excess = len(pending) + inflight - self.queue_max
        if excess <= 0:
            return pending
        victims = sorted(n for n in pending if len(n) == 24)[:excess]
        if not victims:
            return pending
        for name in victims:
            write_atomic(self.spool.ok(name), DROPPED)
            unlink_missing_ok(self.spool.error(name))
            del pending[name]
        self.dropped += len(victims)
        write_atomic(self.spool.dropped_path, f"{self.spool.dropped_total() + len(victims)}\n")
        log.error("ARCHIVE QUEUE LIMIT: %d WAL files waiting exceed BACKUP_ARCHIVE_QUEUE_MAX=%d; DROPPED %d segment(s) "
                  "without archiving (%s .. %s). The WAL archive now has a gap: take a full backup.",
                  len(pending) + len(victims) + inflight, self.queue_max, len(victims), victims[0], victims[-1])
        return pending

    def _record(self, name: str, fut: Future[PushResult]) -> None:
        exc = fut.exception()
        if exc is None:
            result = fut.result()
            write_atomic(self.spool.ok(name), result.status)
            unlink_missing_ok(self.spool.error(name))
            self.pushed += 1
            log.info("pushed %s (%s, %.0f ms)", name, result.status, result.seconds * 1000)
            return
        body = _error_body(exc)
        log.error("push of %s failed: %s", name, body["message"])
        write_atomic(self.spool.error(name), json.dumps(body))


def _error_body(exc: BaseException | None) -> dict[str, Any]:
    if isinstance(exc, SaveitError):
        return {**exc.to_dict(), "exit_status": exc.exit_status}
    return {"code": "SVB-000", "kind": "SaveitError", "message": f"{type(exc).__name__}: {exc}", "hint": "", "exit_status": 1}


def status(settings: Settings, pg_wal: str) -> dict[str, Any]:
    """What the spool holds (for wal-async-status and the service's metrics)."""
    spool = Spool.for_cluster(settings, pg_wal)
    ready = 0
    try:
        ready = sum(1 for e in os.scandir(os.path.join(pg_wal, "archive_status")) if e.name.endswith(".ready"))
    except OSError:
        pass
    errs: list[dict[str, Any]] = []
    ok = 0
    if os.path.isdir(spool.status):
        for e in os.scandir(spool.status):
            if e.name.endswith(".ok"):
                ok += 1
            elif e.name.endswith(".error"):
                try:
                    with open(e.path) as f:
                        errs.append({"name": e.name[: -len(".error")], **json.load(f)})
                except (OSError, ValueError):
                    pass
    pid = None
    try:
        with open(spool.pid_path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    return {"spool": spool.root, "pg_wal": pg_wal, "worker_running": spool.worker_running(), "worker_pid": pid,
            "ready": ready, "pushed_waiting_ack": ok, "errors": errs, "dropped_total": spool.dropped_total(),
            "queue_max": settings.archive_queue_max}


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the detached worker (``python -m saveit_backup.ops.wal_async``)."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="saveit-backup wal-push-worker")
    p.add_argument("--pg-wal", required=True)
    p.add_argument("--spool")
    p.add_argument("--config")
    p.add_argument("--repo")
    p.add_argument("--jobs", type=int)
    p.add_argument("--idle-exit", type=float, default=DEFAULT_IDLE_EXIT)
    args = p.parse_args(argv)
    from saveit_backup import config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s", stream=sys.stderr)
    import faulthandler

    faulthandler.enable()  # segments are mapped (wal_push._contents): a SIGBUS is written to the log before the worker dies
    try:
        settings = config.load({"repository": args.repo}, config_file=args.config)
        spool = Spool(os.path.abspath(args.spool)) if args.spool else Spool.for_cluster(settings, args.pg_wal)
        worker = Worker(settings, spool, os.path.abspath(args.pg_wal), args.jobs or max(2, settings.jobs * 2), args.idle_exit)
        signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
        signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
        return worker.run()
    except SaveitError as exc:
        log.error("async WAL worker failed: %s", exc)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(worker_main())
