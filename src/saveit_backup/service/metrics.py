"""Prometheus metrics of the service, from a private registry.

Figures about the repository come from the latest ``ops.status.Facts`` gathered by the
refresher loop (no I/O at scrape time); ages (the WAL archive lag) are computed at scrape time,
so they keep growing while the repository is unreachable.  Names:

=============================================================  ==========================================
``saveit_backup_last_success_timestamp_seconds{type}``          newest good backup of each type (finish)
``saveit_backup_last_duration_seconds{type}``                    its duration
``saveit_backup_last_size_bytes{type}``                          its stored size
``saveit_backup_failures_total{type}``                           failed runs of each scheduled job (job name)
``saveit_wal_archive_lag_seconds``                               age of the last restorable point (= RPO)
``saveit_pitr_window_start_timestamp_seconds`` / ``_end_``       restorable window
``saveit_repository_size_bytes``                                 bytes stored in the repository
``saveit_restore_test_last_success``                             1 when the last restore test passed
``saveit_restore_test_last_duration_seconds``                    its duration (the measured RTO)
``saveit_restore_test_last_timestamp_seconds``                   when it ran
``saveit_backup_enabled``                                        BACKUP_ENABLED
``saveit_objective_rpo_seconds`` / ``saveit_objective_rto_seconds``  the objectives
``saveit_wal_archive_queue_dropped_total``                       segments dropped by the async queue limit
``saveit_job_running{job}``                                      1 while the job runs
=============================================================  ==========================================

``type`` on the ``last_*`` metrics is the backup type stored (logical, full, diff, incr); on
``failures_total`` it is the scheduled job that failed (full, incremental, logical, verify,
restore_test).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from saveit_backup.ops.status import last_restorable_point

if TYPE_CHECKING:
    from saveit_backup.service.loops import ServiceState


class ServiceCollector(Collector):
    def __init__(self, state: ServiceState, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = self.state.metrics_snapshot()
        facts = snap["facts"]
        settings = snap["settings"]
        now = self.clock()

        success = GaugeMetricFamily("saveit_backup_last_success_timestamp_seconds",
                                    "Finish time of the newest good backup of each type", labels=["type"])
        duration = GaugeMetricFamily("saveit_backup_last_duration_seconds", "Duration of the newest good backup", labels=["type"])
        size = GaugeMetricFamily("saveit_backup_last_size_bytes", "Stored size of the newest good backup", labels=["type"])
        newest: dict[str, Any] = {}
        if facts is not None:
            for m in facts.manifests:
                if m.finished and m.checksum_ok:
                    newest[m.type] = m
        for kind, m in sorted(newest.items()):
            success.add_metric([kind], m.finished_at.timestamp())
            duration.add_metric([kind], m.duration_seconds)
            size.add_metric([kind], float(m.stored_bytes))
        yield success
        yield duration
        yield size

        failures = CounterMetricFamily("saveit_backup_failures", "Failed runs of each scheduled job", labels=["type"])
        for job, count in sorted(snap["failures"].items()):
            failures.add_metric([job], float(count))
        yield failures

        restorable = last_restorable_point(facts) if facts is not None else None
        lag = GaugeMetricFamily("saveit_wal_archive_lag_seconds",
                                "Age of the newest archived WAL segment (of the newest backup without a WAL archive): the current RPO")
        if restorable is not None:
            lag.add_metric([], max(0.0, now - restorable))
        yield lag
        start = GaugeMetricFamily("saveit_pitr_window_start_timestamp_seconds", "Oldest restorable point")
        end = GaugeMetricFamily("saveit_pitr_window_end_timestamp_seconds", "Newest restorable point")
        if facts is not None:
            finished = [m.finished_at.timestamp() for m in facts.manifests if m.finished and m.checksum_ok]
            if finished:
                start.add_metric([], min(finished))
            if restorable is not None:
                end.add_metric([], restorable)
        yield start
        yield end
        repo_size = GaugeMetricFamily("saveit_repository_size_bytes", "Bytes stored in the repository")
        if facts is not None:
            repo_size.add_metric([], float(facts.repository_bytes))
        yield repo_size

        rt = facts.restore_test if facts is not None else None
        rt_ok = GaugeMetricFamily("saveit_restore_test_last_success", "1 when the last restore test passed, 0 when it failed")
        rt_dur = GaugeMetricFamily("saveit_restore_test_last_duration_seconds", "Duration of the last restore test (measured RTO)")
        rt_at = GaugeMetricFamily("saveit_restore_test_last_timestamp_seconds", "When the last restore test ran")
        if rt:
            if rt.get("started"):
                from saveit_backup.domain.manifest import parse_iso

                rt_at.add_metric([], parse_iso(str(rt["started"])).timestamp())
            rt_ok.add_metric([], 1.0 if rt.get("ok") else 0.0)
            if rt.get("duration_seconds") is not None:
                rt_dur.add_metric([], float(rt["duration_seconds"]))
        yield rt_ok
        yield rt_dur
        yield rt_at

        yield GaugeMetricFamily("saveit_backup_enabled", "1 when scheduled backups run (BACKUP_ENABLED)",
                                value=1.0 if settings.enabled else 0.0)
        yield GaugeMetricFamily("saveit_objective_rpo_seconds", "Recovery point objective", value=float(settings.rpo_seconds))
        yield GaugeMetricFamily("saveit_objective_rto_seconds", "Recovery time objective", value=float(settings.rto_seconds))
        yield CounterMetricFamily("saveit_wal_archive_queue_dropped", "WAL segments dropped by the async archive queue limit",
                                  value=float(facts.dropped_total if facts is not None else 0))
        running = GaugeMetricFamily("saveit_job_running", "1 while the job runs", labels=["job"])
        for job in snap["jobs"]:
            running.add_metric([job], 1.0 if snap["running"] == job else 0.0)
        yield running


def build_registry(state: ServiceState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(state))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)
