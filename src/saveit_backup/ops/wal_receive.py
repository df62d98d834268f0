"""Streaming WAL archiving: ``pg_receivewal`` into a staging directory, then the push logic.

* The replication slot is created if missing (``--create-slot --if-not-exists``), so the
  server keeps WAL until it has been received, even across restarts of this command.
* Every completed file in the staging directory (segments and ``.history`` files; never the
  ``.partial`` one being written) is stored with ``push_file`` (header check, write-once,
  idempotent) and its local copy deleted once stored.  The same segment archived by
  ``archive_command`` as well is fine: identical content is success.
* Runs until SIGTERM/SIGINT (or ``until_segment`` is stored, or ``timeout`` passes), then
  stops ``pg_receivewal`` and stores what it completed.  ``pg_receivewal`` is restarted with
  backoff if it exits (server restart, network).  A ``WalMismatch`` or ``IntegrityError``
  stops the command: something else is writing this archive.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from saveit_backup.errors import IntegrityError, PgToolError, SaveitError, WalMismatch

if TYPE_CHECKING:
    from saveit_backup.config import Settings
    from saveit_backup.repo.repository import Repository

log = logging.getLogger("saveit_backup.wal")

POLL_SECONDS = 0.5


@dataclass
class ReceiveStats:
    stored: int = 0
    existing: int = 0
    last: str | None = None
    restarts: int = 0
    names: list[str] = field(default_factory=list)


def _bindir(settings: Settings) -> str:
    if settings.pg_bindir:
        return str(settings.pg_bindir)
    from saveit_backup.pg.cluster import default_bindir

    return default_bindir()


def _conn_args(settings: Settings) -> list[str]:
    return ["-d", str(settings.dbname)] if settings.dbname else []


def create_slot(settings: Settings, slot: str) -> None:
    tool = os.path.join(_bindir(settings), "pg_receivewal")
    proc = subprocess.run([tool, *_conn_args(settings), "--slot", slot, "--create-slot", "--if-not-exists", "--no-password"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PgToolError(f"pg_receivewal --create-slot {slot} failed: {proc.stderr.strip()[-400:]}")


class Receiver:
    def __init__(self, settings: Settings, repo: Repository, slot: str, staging: str) -> None:
        self.settings = settings
        self.repo = repo
        self.slot = slot
        self.staging = os.path.abspath(staging)
        self.stop = threading.Event()
        self.stats = ReceiveStats()
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> None:
        tool = os.path.join(_bindir(self.settings), "pg_receivewal")
        args = [tool, *_conn_args(self.settings), "-D", self.staging, "--slot", self.slot, "--no-password"]
        log.info("starting %s", " ".join(a for a in args if a not in _conn_args(self.settings)))
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def _stop_receiver(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # pg_receivewal flushes and exits cleanly on SIGINT
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def store_completed(self) -> None:
        """Push every completed file in staging (history first, oldest first); delete what is stored."""
        from saveit_backup.ops.wal_push import push_file, wal_name

        names = sorted((n for n in os.listdir(self.staging) if not n.endswith(".partial") and not n.startswith(".")),
                       key=lambda n: (0 if n.endswith(".history") else 1, n))
        for name in names:
            try:
                wal_name(name)
            except SaveitError:
                continue
            path = os.path.join(self.staging, name)
            try:
                result = push_file(self.repo, path, mapped=False)
            except (WalMismatch, IntegrityError):
                raise
            except SaveitError as exc:  # transient: keep the local copy, retry on the next round
                log.warning("storing streamed %s failed (will retry): %s", name, exc)
                return
            os.unlink(path)
            if result.status == "stored":
                self.stats.stored += 1
            else:
                self.stats.existing += 1
            self.stats.names.append(name)
            if len(name) == 24:
                self.stats.last = name
            log.info("stored streamed %s (%s)", name, result.status)

    def run(self, until_segment: str | None = None, timeout: float | None = None) -> ReceiveStats:
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        create_slot(self.settings, self.slot)
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 1.0
        restart_at = 0.0
        try:
            while not self.stop.is_set():
                if self._proc is None or self._proc.poll() is not None:
                    if self._proc is not None:
                        log.warning("pg_receivewal exited with status %s; restarting in %.0f s", self._proc.returncode, backoff)
                        self.stats.restarts += 1
                        self._proc = None
                        restart_at = time.monotonic() + backoff
                        backoff = min(backoff * 2, 30.0)
                    if time.monotonic() >= restart_at:
                        self._start()
                self.store_completed()
                if until_segment and self.stats.last and self.stats.last >= until_segment:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self.stop.wait(POLL_SECONDS)
        finally:
            self._stop_receiver()
        self.store_completed()
        return self.stats


def receive(settings: Settings, slot: str, staging: str | None = None, until_segment: str | None = None,
            timeout: float | None = None) -> ReceiveStats:
    """Run until SIGTERM/SIGINT, ``until_segment`` stored or ``timeout`` seconds."""
    from saveit_backup.ops.wal_push import open_repo

    repo = open_repo(settings)
    receiver = Receiver(settings, repo, slot, staging or f"/var/tmp/saveit-receive-{slot}")
    previous = {sig: signal.signal(sig, lambda *_: receiver.stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return receiver.run(until_segment, timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
