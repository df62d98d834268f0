"""Backup status and recovery objectives, computed from the repository.

Shared by ``saveit-backup status`` and the service's ``/status`` and ``/metrics``.
:func:`gather` does the I/O (one listing of the repository, the manifests, the restore test
record, the service state); :func:`build_status` is pure and turns those facts into the report.

Definitions:

* *last restorable point*: the newest archived WAL segment's modification time when a WAL
  archive exists, else the newest backup's finish time;
* *WAL archive lag* (= current RPO): now minus the last restorable point;
* *PITR window*: from the oldest backup's finish time to the last restorable point (without a
  WAL archive these are the ends of a set of discrete restore points, not a continuous window);
* RPO objective: met when the lag is at most BACKUP_RPO_SECONDS (breached when no backup exists);
* RTO objective: met when the last restore test succeeded in at most BACKUP_RTO_SECONDS;
  breached when it was slower or failed; unknown when never tested.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from saveit_backup.compose import Context
from saveit_backup.config import Settings
from saveit_backup.domain.manifest import Manifest, iso, utcnow
from saveit_backup.errors import NotFound, SaveitError
from saveit_backup.repo import layout
from saveit_backup.units import human_bytes

log = logging.getLogger(__name__)

STATE_KEY = "service/state.json"
SCHEDULE_SETTINGS = {"full": "schedule_full", "incremental": "schedule_incremental", "logical": "schedule_logical",
                     "verify": "schedule_verify", "restore_test": "schedule_restore_test"}
BACKUP_TYPES = ("full", "diff", "incr", "logical")


@dataclass
class Facts:
    """What the repository says, gathered in one pass."""

    gathered: datetime
    manifests: list[Manifest] = field(default_factory=list)
    wal_segments: int = 0
    wal_newest: float | None = None  # epoch seconds (object mtime)
    repository_bytes: int = 0
    restore_test: dict[str, Any] | None = None
    service_state: dict[str, Any] = field(default_factory=dict)
    dropped_total: int = 0
    error: dict[str, str] | None = None


def schedules_of(settings: Settings) -> dict[str, str]:
    return {job: str(getattr(settings, name) or "") for job, name in SCHEDULE_SETTINGS.items()}


def load_service_state(ctx: Context) -> dict[str, Any]:
    from saveit_backup.storage.base import read_all

    try:
        body = json.loads(read_all(ctx.repo.storage, STATE_KEY))
    except NotFound:
        return {}
    except ValueError:
        log.warning("%s is not valid JSON; ignoring it", STATE_KEY)
        return {}
    return body if isinstance(body, dict) else {}


def save_service_state(ctx: Context, state: Mapping[str, Any]) -> None:
    ctx.repo.storage.put(STATE_KEY, json.dumps(state, indent=1, sort_keys=True, default=str).encode())


def dropped_total(settings: Settings) -> int:
    """Segments dropped by the async archive queue limit (the spool's counter), 0 without a spool."""
    from saveit_backup.ops.wal_async import Spool

    if settings.spool_dir:
        spool = Spool(os.path.abspath(settings.spool_dir))
    elif settings.pgdata:
        spool = Spool.for_cluster(settings, os.path.join(settings.pgdata, "pg_wal"))
    else:
        return 0
    try:
        return spool.dropped_total()
    except OSError:
        return 0


def gather(ctx: Context) -> Facts:
    """Read the repository; a failure is reported in ``Facts.error``, never raised."""
    from saveit_backup.ops.restore_test import load_result

    facts = Facts(gathered=utcnow())
    try:
        facts.dropped_total = dropped_total(ctx.settings)
    except Exception as exc:  # a broken spool must not break status
        log.debug("cannot read the archive spool: %s", exc)
    try:
        repo = ctx.repo
        repo.load_config()
        total = 0
        wal_count = 0
        wal_newest: float | None = None
        for info in repo.storage.list(""):
            total += info.size
            if info.key.startswith(layout.WAL):
                wal_count += 1
                if info.mtime is not None and (wal_newest is None or info.mtime > wal_newest):
                    wal_newest = info.mtime
        facts.repository_bytes = total
        facts.wal_segments = wal_count
        facts.wal_newest = wal_newest
        facts.manifests = repo.manifests()
        facts.restore_test = load_result(ctx)
        facts.service_state = load_service_state(ctx)
    except SaveitError as exc:
        facts.error = exc.to_dict()
    return facts


def _objective(objective: int, actual: float | None, status: str, detail: str) -> dict[str, Any]:
    return {"objective_seconds": objective, "actual_seconds": None if actual is None else round(actual, 3),
            "status": status, "detail": detail}


def last_restorable_point(facts: Facts) -> float | None:
    finished = [m.finished_at.timestamp() for m in facts.manifests if m.finished and m.checksum_ok]
    newest_backup = max(finished, default=None)
    if facts.wal_newest is not None and newest_backup is not None:
        return max(facts.wal_newest, newest_backup)
    return newest_backup if newest_backup is not None else facts.wal_newest


def build_status(facts: Facts, settings: Settings, now: datetime, service: Mapping[str, Any] | None = None,
                 next_count: int = 3) -> dict[str, Any]:
    """The status report (pure)."""
    from saveit_backup.service.scheduler import CronSchedule

    nowts = now.timestamp()
    backups: dict[str, Any] = {}
    for m in facts.manifests:
        if m.finished and m.checksum_ok:
            backups[m.type] = {"id": m.id, "finished": m.finished, "age_seconds": round(nowts - m.finished_at.timestamp(), 3),
                               "stored_bytes": m.stored_bytes, "plain_bytes": m.plain_bytes,
                               "duration_seconds": round(m.duration_seconds, 3)}
    restorable = last_restorable_point(facts)
    good = [m for m in facts.manifests if m.finished and m.checksum_ok]
    window_start = min((m.finished_at.timestamp() for m in good), default=None)
    lag = None if restorable is None else max(0.0, nowts - restorable)

    if facts.error and restorable is None:
        rpo = _objective(settings.rpo_seconds, None, "unknown", f"repository unreadable: {facts.error.get('message')}")
    elif restorable is None:
        rpo = _objective(settings.rpo_seconds, None, "breached", "no backup in the repository")
    else:
        status = "met" if lag is not None and lag <= settings.rpo_seconds else "breached"
        rpo = _objective(settings.rpo_seconds, lag, status,
                         f"last restorable point {iso(datetime.fromtimestamp(restorable, now.tzinfo))}")
    rt = facts.restore_test
    if not rt:
        rto = _objective(settings.rto_seconds, None, "unknown", "no restore test recorded")
    elif not rt.get("ok"):
        err = (rt.get("error") or {}).get("message", "failed")
        rto = _objective(settings.rto_seconds, rt.get("duration_seconds"), "breached",
                         f"last restore test ({rt.get('started')}) failed: {err}")
    else:
        dur = float(rt.get("duration_seconds") or 0.0)
        rto = _objective(settings.rto_seconds, dur, "met" if dur <= settings.rto_seconds else "breached",
                         f"last restore test {rt.get('started')} of backup {rt.get('backup_id')}")

    schedules: dict[str, Any] = {}
    for job, expr in schedules_of(settings).items():
        entry: dict[str, Any] = {"cron": expr, "next": []}
        if not expr:
            entry["disabled"] = True
        else:
            try:
                entry["next"] = [iso(t) for t in CronSchedule(expr).upcoming(now, next_count)] if settings.enabled else []
            except SaveitError as exc:
                entry["error"] = exc.message
        last = (facts.service_state.get("jobs") or {}).get(job)
        if last:
            entry["last"] = last
        schedules[job] = entry

    return {
        "generated": iso(now),
        "enabled": bool(settings.enabled),
        "repository": settings.repository_url,
        "repository_error": facts.error,
        "repository_size_bytes": facts.repository_bytes,
        "backup_count": len(facts.manifests),
        "backups": backups,
        "wal": {"archived": facts.wal_segments > 0, "segments": facts.wal_segments,
                "newest": None if facts.wal_newest is None else iso(datetime.fromtimestamp(facts.wal_newest, now.tzinfo)),
                "lag_seconds": None if lag is None else round(lag, 3), "queue_dropped_total": facts.dropped_total},
        "pitr": {"start": None if window_start is None else iso(datetime.fromtimestamp(window_start, now.tzinfo)),
                 "end": None if restorable is None else iso(datetime.fromtimestamp(restorable, now.tzinfo))},
        "restore_test": rt,
        "schedules": schedules,
        "objectives": {"rpo": rpo, "rto": rto},
        "service": dict(service) if service is not None else None,
    }


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def render_text(status: Mapping[str, Any]) -> str:
    """The human form of the status report (``saveit-backup status``)."""
    lines = [f"repository {status['repository']}: {status['backup_count']} backup(s), "
             f"{human_bytes(status['repository_size_bytes'])}"
             + ("" if status["enabled"] else "  [scheduled backups DISABLED: BACKUP_ENABLED=false]")]
    if status.get("repository_error"):
        lines.append(f"  repository error: {status['repository_error'].get('code')} {status['repository_error'].get('message')}")
    lines.append("last backups:")
    if not status["backups"]:
        lines.append("  none")
    for kind, b in status["backups"].items():
        lines.append(f"  {kind:<8} {b['id']:<18} age {human_age(b['age_seconds']):>8}  size {human_bytes(b['stored_bytes'])}"
                     f"  ({b['duration_seconds']:.1f} s)")
    wal = status["wal"]
    lines.append(f"WAL archive: {wal['segments']} file(s), newest {wal['newest'] or '-'}, lag {human_age(wal['lag_seconds'])}")
    lines.append(f"PITR window: {status['pitr']['start'] or '-'} .. {status['pitr']['end'] or '-'}")
    rt = status.get("restore_test")
    if rt:
        lines.append(f"last restore test: {rt.get('started')} backup {rt.get('backup_id')} "
                     f"{'ok' if rt.get('ok') else 'FAILED'} in {rt.get('duration_seconds')} s")
    lines.append("schedules (UTC):")
    for job, s in status["schedules"].items():
        if s.get("disabled"):
            lines.append(f"  {job:<13} disabled")
        elif s.get("error"):
            lines.append(f"  {job:<13} {s['cron']!r}: {s['error']}")
        else:
            nxt = ", ".join(t[:19].replace("T", " ") for t in s["next"]) or "- (service disabled)"
            lines.append(f"  {job:<13} {s['cron']:<18} next {nxt}")
    for name, o in status["objectives"].items():
        actual = "-" if o["actual_seconds"] is None else f"{o['actual_seconds']:.1f} s"
        lines.append(f"{name.upper()}: {o['status'].upper()} (objective {o['objective_seconds']} s, actual {actual}; {o['detail']})")
    return "\n".join(lines)
