"""Notifications: webhook on failure and on objective breach, heartbeat after each success.

Everything is sent from one background thread (the ``notifier`` loop) with short timeouts;
nothing here ever raises into the scheduler.  Deduplication:

* a job failure is posted when the job's previous outcome was not already a failure with the
  same error code (a retry storm posts once; a success re-arms it);
* an objective is posted when its status changes to ``breached`` and again when it recovers.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from collections.abc import Mapping
from typing import Any

from saveit_backup.domain.manifest import iso, utcnow

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, webhook_url: str = "", heartbeat_url: str = "", timeout: float = 5.0) -> None:
        self.webhook_url = webhook_url
        self.heartbeat_url = heartbeat_url
        self.timeout = timeout
        self._queue: queue.Queue[tuple[str, str, bytes | None] | None] = queue.Queue(maxsize=1000)
        self._failed: dict[str, str] = {}  # job -> error code of its current failure streak
        self._objectives: dict[str, str] = {}
        self._lock = threading.Lock()
        self.sent = 0
        self.errors = 0

    # --- events (called by the scheduler and refresher; never block, never raise) ---------
    def job_failed(self, job: str, error: Mapping[str, Any] | None, attempt: int, will_retry: bool) -> None:
        code = str((error or {}).get("code") or (error or {}).get("kind") or "error")
        with self._lock:
            if self._failed.get(job) == code:
                return
            self._failed[job] = code
        self._webhook({"event": "job_failed", "job": job, "error": dict(error or {}), "attempt": attempt,
                       "will_retry": will_retry})

    def job_succeeded(self, job: str, summary: Mapping[str, Any]) -> None:
        with self._lock:
            self._failed.pop(job, None)
        if self.heartbeat_url:
            self._put("GET", self.heartbeat_url, None)

    def objectives(self, objectives: Mapping[str, Mapping[str, Any]]) -> None:
        for name, o in objectives.items():
            status = str(o.get("status"))
            with self._lock:
                before = self._objectives.get(name)
                self._objectives[name] = status
            if status == "breached" and before != "breached":
                self._webhook({"event": "objective_breached", "objective": name, **dict(o)})
            elif before == "breached" and status == "met":
                self._webhook({"event": "objective_recovered", "objective": name, **dict(o)})

    def _webhook(self, body: dict[str, Any]) -> None:
        if not self.webhook_url:
            return
        body = {"source": "saveit-backup", "time": iso(utcnow()), **body}
        self._put("POST", self.webhook_url, json.dumps(body, default=str).encode())

    def _put(self, method: str, url: str, data: bytes | None) -> None:
        try:
            self._queue.put_nowait((method, url, data))
        except queue.Full:
            log.warning("notification queue full: dropping a %s notification", method)

    # --- the loop ----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is None:
                return
            self._send(*item)

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def _send(self, method: str, url: str, data: bytes | None) -> None:
        headers = {"User-Agent": "saveit-backup"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read(1024)
            self.sent += 1
        except Exception as exc:  # never raise into the service; the URL may hold a token: do not log it
            self.errors += 1
            log.warning("%s notification failed: %s", "webhook" if method == "POST" else "heartbeat", type(exc).__name__)
