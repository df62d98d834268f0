"""``saveit-backup serve``: a few named loops supervised together, with cooperative shutdown.

Loops (threads of one process):

* ``scheduler``: picks the one job due now (service.scheduler, pure) and runs it in a child
  process (service.runner); records the outcome, retries with backoff, persists last successes;
* ``refresher``: re-reads the repository (ops.status.gather) every ``refresh`` seconds and after
  each job, for ``/status`` and ``/metrics``, and posts objective breaches;
* ``notifier``: sends webhooks and heartbeats (service.notify);
* ``http``: ``/health/live``, ``/health/ready``, ``/metrics``, ``/status`` (service.http).

SIGTERM/SIGINT set one ``stop`` event: every loop returns at its next check; a running job gets
``grace`` seconds and is then aborted (its process group is killed; without a manifest nothing
of it is visible).  If a loop dies of an unexpected error the service stops with exit status 1,
so that its supervisor (systemd, Kubernetes) restarts it.

Catch-up persistence: the last successful slot of each job is stored in the repository at
``service/state.json`` (ops.status.STATE_KEY), next to the data it describes, so it survives
a new host or container.  At start, a job whose last slot before now is later than its last
successful slot runs once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import FrameType
from typing import Any

from saveit_backup.compose import Context
from saveit_backup.config import Settings
from saveit_backup.domain.manifest import iso, parse_iso, utcnow
from saveit_backup.errors import RepositoryNotInitialized, SaveitError
from saveit_backup.ops import status as status_ops
from saveit_backup.service.notify import Notifier
from saveit_backup.service.runner import JobRunner, RunResult
from saveit_backup.service.scheduler import Backoff, CronSchedule, JobState, Scheduler, ordered, parse_schedules

log = logging.getLogger("saveit_backup.service")


@dataclass
class ServiceOptions:
    grace: float = 60.0
    refresh: float = 30.0
    backoff: Backoff = field(default_factory=Backoff)
    verbose: bool = False


class ServiceState:
    """What the loops share (guarded by one lock)."""

    def __init__(self, settings: Settings, jobs: list[str]) -> None:
        self.settings = settings
        self.jobs = jobs
        self.lock = threading.Lock()
        self.facts: status_ops.Facts | None = None
        self.failures: dict[str, int] = dict.fromkeys(jobs, 0)
        self.running: str | None = None
        self.running_since: float | None = None
        self.last: dict[str, dict[str, Any]] = {}
        self.next_due: dict[str, str] = {}
        self.started = utcnow()

    def metrics_snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"facts": self.facts, "settings": self.settings, "failures": dict(self.failures),
                    "running": self.running, "jobs": list(self.jobs)}

    def service_view(self) -> dict[str, Any]:
        with self.lock:
            return {"started": iso(self.started), "enabled": bool(self.settings.enabled), "running": self.running,
                    "running_seconds": None if self.running_since is None else round(time.monotonic() - self.running_since, 1),
                    "failures_total": dict(self.failures), "last_runs": dict(self.last), "next_due": dict(self.next_due)}


class Service:
    def __init__(self, settings: Settings, options: ServiceOptions, clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.options = options
        self.clock = clock
        self.ctx = Context(settings)
        self.schedules: dict[str, CronSchedule] = parse_schedules(status_ops.schedules_of(settings)) if settings.enabled else {}
        self.state = ServiceState(settings, ordered(self.schedules))
        self.notifier = Notifier(settings.webhook_url, settings.heartbeat_url)
        self.runner = JobRunner(settings, verbose=options.verbose)
        self.stop = threading.Event()
        self.refresh_now = threading.Event()
        self.crashed: list[str] = []
        self.persisted: dict[str, Any] = {"jobs": {}}
        from saveit_backup.service.http import HttpServer

        self.http = HttpServer(self, settings.http_host, settings.http_port)  # binds now: a busy port fails at start

    # --- supervision ---------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> int:
        if install_signals:
            def on_signal(signum: int, frame: FrameType | None) -> None:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        loops: dict[str, Callable[[], None]] = {"scheduler": self.scheduler_loop, "refresher": self.refresher_loop,
                                                "notifier": lambda: self.notifier.run(self.stop), "http": self.http.serve}
        threads = {name: threading.Thread(target=self._guard, args=(name, fn), name=name, daemon=True)
                   for name, fn in loops.items()}
        host, port = self.http.address
        log.info("service started: http://%s:%d, %s", host, port,
                 "jobs " + ", ".join(f"{j} '{self.schedules[j].expr}'" for j in self.state.jobs)
                 if self.settings.enabled else "BACKUP_ENABLED=false: idle, no scheduled jobs",
                 extra={"event": "service_start", "enabled": bool(self.settings.enabled), "http_port": port})
        for t in threads.values():
            t.start()
        while not self.stop.wait(0.5):
            pass
        self.refresh_now.set()  # wake the refresher so it sees the stop
        t0 = time.monotonic()
        threads["scheduler"].join()
        self.notifier.close()
        threads["notifier"].join(timeout=3)
        self.http.shutdown()
        threads["refresher"].join(timeout=3)
        log.info("service stopped in %.1f s", time.monotonic() - t0, extra={"event": "service_stop"})
        return 1 if self.crashed else 0

    def _guard(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException:
            log.exception("loop %s died: stopping the service", name)
            self.crashed.append(name)
            self.stop.set()

    # --- scheduler loop ------------------------------------------------------------------
    def _load_last_success(self) -> dict[str, datetime | None]:
        try:
            body = status_ops.load_service_state(self.ctx)
        except RepositoryNotInitialized:
            body = {}
        except SaveitError as exc:
            log.warning("cannot read the service state (%s): no catch-up runs this time", exc)
            body = {}
        self.persisted = {"jobs": dict(body.get("jobs") or {})}
        out: dict[str, datetime | None] = {}
        for job, entry in self.persisted["jobs"].items():
            try:
                out[job] = parse_iso(entry["last_success_slot"]) if entry.get("last_success_slot") else None
            except (ValueError, TypeError, KeyError):
                out[job] = None
        return out

    def scheduler_loop(self) -> None:
        if not self.settings.enabled:
            log.info("BACKUP_ENABLED=false: no jobs are scheduled; the service stays up, healthy and idle")
            self.stop.wait()
            return
        sched = Scheduler(self.schedules, self.clock(), self._load_last_success(), self.options.backoff)
        for state in sched.jobs.values():
            if state.catch_up:
                log.info("job %s missed its run of %s while the service was down: running it now", state.name, iso(state.slot),
                         extra={"event": "catch_up", "job": state.name, "slot": iso(state.slot)})
        self._publish_due(sched)
        while not self.stop.is_set():
            now = self.clock()
            job = sched.next_job(now)
            if job is None:
                wake = sched.next_wakeup()
                timeout = 60.0 if wake is None else (wake - now).total_seconds()
                self.stop.wait(min(max(timeout, 0.02), 60.0))
                continue
            self._run_one(sched, job)
            self._publish_due(sched)

    def _publish_due(self, sched: Scheduler) -> None:
        with self.state.lock:
            self.state.next_due = {name: iso(j.due) for name, j in sched.jobs.items()}

    def _run_one(self, sched: Scheduler, job: JobState) -> None:
        name = job.name
        slot = job.slot  # record() moves the job to its next slot
        attempt = job.failures + 1
        log.info("job %s started (slot %s, attempt %d%s)", name, iso(slot), attempt, ", catch-up" if job.catch_up else "",
                 extra={"event": "job_start", "job": name, "slot": iso(slot), "attempt": attempt, "catch_up": job.catch_up})
        with self.state.lock:
            self.state.running = name
            self.state.running_since = time.monotonic()
        try:
            result = self.runner.run(name, self.stop, self.options.grace)
        finally:
            with self.state.lock:
                self.state.running = None
                self.state.running_since = None
        if self.stop.is_set() and not result.ok:
            self._log_end(result, "aborted", None)
            return  # not recorded: the slot stays unserved and is caught up at the next start
        decision = sched.record(name, self.clock(), result.ok)
        entry = self.persisted["jobs"].setdefault(name, {})
        if result.ok:
            entry.update(last_success_slot=iso(slot), last_success=iso(self.clock()),
                         backup_id=result.summary.get("backup_id"), duration_seconds=round(result.duration_seconds, 3))
            self.notifier.job_succeeded(name, result.summary)
        else:
            with self.state.lock:
                self.state.failures[name] = self.state.failures.get(name, 0) + 1
            entry.update(last_failure=iso(self.clock()), last_error=result.error)
            self.notifier.job_failed(name, result.error, attempt, decision.reason == "retry")
        with self.state.lock:
            self.state.last[name] = {"finished": iso(self.clock()), "ok": result.ok, "duration_seconds": round(result.duration_seconds, 3),
                                     "backup_id": result.summary.get("backup_id"), "error": result.error,
                                     "next": iso(decision.due), "next_reason": decision.reason}
        self._log_end(result, "success" if result.ok else "failure", decision.due, decision.reason)
        self._save_state()
        self.refresh_now.set()

    def _log_end(self, result: RunResult, outcome: str, next_due: datetime | None, reason: str = "") -> None:
        s = result.summary
        extra = {"event": "job_end", "job": result.job, "outcome": outcome, "duration_seconds": round(result.duration_seconds, 3),
                 "backup_id": s.get("backup_id"), "bytes": s.get("bytes", 0), "backup_type": s.get("type"),
                 "next_run": iso(next_due) if next_due else None}
        if result.error:
            extra["error_code"] = result.error.get("code")
            extra["error"] = result.error.get("message")
        if s.get("type"):
            what = f": backup {s.get('backup_id')} ({s.get('type')}) committed, {s.get('bytes', 0)} bytes stored"
        elif s.get("backup_id"):
            what = f": backup {s.get('backup_id')} {'verified' if result.job == 'verify' else 'restored and checked'}"
        else:
            what = ""
        text = (f"job {result.job} {outcome} in {result.duration_seconds:.1f} s{what}"
                + (f": {result.error.get('code')} {result.error.get('message')}" if result.error else "")
                + (f"; next run {iso(next_due)} ({reason})" if next_due else ""))
        if outcome == "success":
            log.info(text, extra=extra)
        else:
            log.error(text, extra=extra)

    def _save_state(self) -> None:
        try:
            status_ops.save_service_state(self.ctx, {**self.persisted, "updated": iso(utcnow())})
        except SaveitError as exc:
            log.warning("cannot record the service state in the repository: %s", exc)

    # --- refresher loop ------------------------------------------------------------------
    def refresh(self) -> status_ops.Facts:
        facts = status_ops.gather(self.ctx)
        with self.state.lock:
            previous = self.state.facts
            if facts.error and previous is not None:
                # keep the last known figures (ages keep growing); say the repository is unreadable
                facts = replace(previous, error=facts.error, gathered=facts.gathered)
            self.state.facts = facts
        return facts

    def refresher_loop(self) -> None:
        while not self.stop.is_set():
            facts = self.refresh()
            if self.stop.is_set():
                return
            if facts.error:
                log.warning("repository unreadable: %s %s", facts.error.get("code"), facts.error.get("message"))
            if self.settings.enabled:
                report = status_ops.build_status(facts, self.settings, utcnow())
                self.notifier.objectives(report["objectives"])
            self.refresh_now.wait(self.options.refresh)
            self.refresh_now.clear()

    # --- views for http --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self.state.lock:
            facts = self.state.facts
        if facts is None:
            facts = status_ops.Facts(gathered=utcnow(), error={"code": "", "message": "not gathered yet", "hint": "", "kind": ""})
        return status_ops.build_status(facts, self.settings, utcnow(), service=self.state.service_view())

    def ready(self, timeout: float = 8.0) -> tuple[bool, dict[str, Any]]:
        if not self.settings.enabled:
            return True, {"status": "idle", "enabled": False, "checks": {}}
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import TimeoutError as FutureTimeout

        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ready")
        futures = {"repository": pool.submit(self._check_repository), "database": pool.submit(self._check_database)}
        checks: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        for name, fut in futures.items():
            try:
                checks[name] = fut.result(timeout=max(0.1, deadline - time.monotonic()))
            except FutureTimeout:
                checks[name] = {"ok": False, "detail": f"no answer within {timeout:.0f} s"}
        pool.shutdown(wait=False)
        ok = all(c["ok"] for c in checks.values())
        return ok, {"status": "ready" if ok else "not ready", "enabled": True, "checks": checks}

    def _check_repository(self) -> dict[str, Any]:
        from saveit_backup.errors import NotFound
        from saveit_backup.repo import layout

        try:
            self.ctx.storage.stat(layout.CONFIG)
            return {"ok": True, "detail": self.settings.repository_url}
        except NotFound:
            return {"ok": True, "detail": "reachable, not initialised yet (the first backup initialises it)"}
        except SaveitError as exc:
            return {"ok": False, "detail": f"{exc.code} {exc.message}"}

    def _check_database(self) -> dict[str, Any]:
        from saveit_backup.pg.conn import connect, describe_dsn

        try:
            connect(self.settings.dbname).close()
            return {"ok": True, "detail": describe_dsn(self.settings.dbname)}
        except SaveitError as exc:
            return {"ok": False, "detail": f"{exc.code} {exc.message}"}
