"""The service's schedule logic with an injected clock: no I/O, no sleeping."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest

from saveit_backup.errors import ConfigError
from saveit_backup.service.scheduler import Backoff, CronSchedule, Scheduler, next_runs, parse_schedules


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def run_until(s: Scheduler, start: datetime, end: datetime, step: timedelta, duration: timedelta = timedelta(0),
              fail: set[str] | None = None) -> list[tuple[str, datetime]]:
    """Drive the scheduler like the service loop does: one job at a time; returns (job, start time)."""
    runs = []
    now = start
    while now < end:
        job = s.next_job(now)
        if job is None:
            now += step
            continue
        runs.append((job.name, now))
        now += duration
        s.record(job.name, now, ok=job.name not in (fail or set()))
    return runs


# --- cron expressions ---------------------------------------------------------------
def test_next_run_times_five_fields_utc() -> None:
    daily = CronSchedule("0 2 * * *")
    assert daily.next_after(t("2026-03-10T01:59:59")) == t("2026-03-10T02:00:00")
    assert daily.next_after(t("2026-03-10T02:00:00")) == t("2026-03-11T02:00:00")  # strictly after
    assert daily.prev_before(t("2026-03-10T02:00:01")) == t("2026-03-10T02:00:00")
    hourly = CronSchedule("0 * * * *")
    assert hourly.upcoming(t("2026-03-10T10:30:00"), 3) == [t("2026-03-10T11:00:00"), t("2026-03-10T12:00:00"),
                                                            t("2026-03-10T13:00:00")]


def test_sunday_is_zero_as_in_cron() -> None:
    # APScheduler 3's from_crontab counts 0 as Monday; croniter follows cron.
    weekly = CronSchedule("0 2 * * 0")
    nxt = weekly.next_after(t("2026-03-10T00:00:00"))  # a Tuesday
    assert nxt == t("2026-03-15T02:00:00") and nxt.weekday() == 6


def test_evaluated_in_utc_whatever_the_clock_zone() -> None:
    daily = CronSchedule("0 2 * * *")
    cest = timezone(timedelta(hours=2))
    now = datetime(2026, 6, 1, 3, 30, tzinfo=cest)  # = 01:30 UTC
    nxt = daily.next_after(now)
    assert nxt == t("2026-06-01T02:00:00") and nxt.tzinfo == UTC
    with pytest.raises(ValueError, match="naive"):
        daily.next_after(datetime(2026, 6, 1, 3, 30))


def test_six_fields_have_seconds_first() -> None:
    every5 = CronSchedule("*/5 * * * * *")
    assert every5.has_seconds
    assert every5.upcoming(t("2026-01-01T00:00:01"), 3) == [t("2026-01-01T00:00:05"), t("2026-01-01T00:00:10"),
                                                           t("2026-01-01T00:00:15")]
    # "30 0 2 * * *": second 30 of 02:00 every day (not minute 30)
    assert CronSchedule("30 0 2 * * *").next_after(t("2026-01-01T00:00:00")) == t("2026-01-01T02:00:30")


@pytest.mark.parametrize("bad", ["* * * *", "* * * * * * *", "61 * * * *", "hello world x y z", "*/5 * * * * 99"])
def test_invalid_expressions_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        CronSchedule(bad)


def test_empty_disables() -> None:
    found = parse_schedules({"full": "0 2 * * *", "incremental": "", "logical": "  ", "verify": "@daily"})
    assert set(found) == {"full", "verify"}
    with pytest.raises(ConfigError, match="schedule of full"):
        parse_schedules({"full": "0 25 * * *"})
    assert next_runs(found, t("2026-01-01T00:00:00"), 2)["full"] == [t("2026-01-01T02:00:00"), t("2026-01-02T02:00:00")]


# --- catch-up ------------------------------------------------------------------------
def test_missed_runs_while_down_give_exactly_one_catch_up() -> None:
    hourly = CronSchedule("0 * * * *")
    # last success at 03:00; service down until 09:20: six slots missed, one run at start
    s = Scheduler({"incremental": hourly}, t("2026-01-01T09:20:00"), {"incremental": t("2026-01-01T03:00:00")})
    job = s.next_job(t("2026-01-01T09:20:00"))
    assert job is not None and job.catch_up and job.slot == t("2026-01-01T09:00:00")
    runs = run_until(s, t("2026-01-01T09:20:00"), t("2026-01-01T11:30:00"), timedelta(minutes=1))
    assert runs == [("incremental", t("2026-01-01T09:20:00")), ("incremental", t("2026-01-01T10:00:00")),
                    ("incremental", t("2026-01-01T11:00:00"))]


def test_no_catch_up_when_not_overdue_or_never_run() -> None:
    daily = CronSchedule("0 2 * * *")
    up_to_date = Scheduler({"full": daily}, t("2026-01-01T09:00:00"), {"full": t("2026-01-01T02:00:00")})
    assert up_to_date.next_job(t("2026-01-01T09:00:00")) is None
    assert up_to_date.next_wakeup() == t("2026-01-02T02:00:00")
    fresh = Scheduler({"full": daily}, t("2026-01-01T09:00:00"), {})
    assert fresh.next_job(t("2026-01-01T09:00:00")) is None  # first start waits for the first slot


def test_catch_up_after_a_failed_slot() -> None:
    # a slot that failed (only successes are persisted) is caught up at the next start
    s = Scheduler({"full": CronSchedule("0 2 * * *")}, t("2026-01-02T08:00:00"), {"full": t("2025-12-31T02:00:00")})
    job = s.next_job(t("2026-01-02T08:00:00"))
    assert job is not None and job.slot == t("2026-01-02T02:00:00")
    s.record("full", t("2026-01-02T08:05:00"), ok=True)
    assert s.jobs["full"].last_success_slot == t("2026-01-02T02:00:00")
    assert s.next_wakeup() == t("2026-01-03T02:00:00")


# --- serialisation ------------------------------------------------------------------
def test_overlapping_jobs_run_one_at_a_time_by_priority() -> None:
    sched = {"verify": CronSchedule("0 2 * * *"), "full": CronSchedule("0 2 * * *"), "incremental": CronSchedule("0 * * * *")}
    s = Scheduler(sched, t("2026-01-01T01:30:00"))
    # each job takes 40 minutes: at 02:00 three are due; they run one after another
    runs = run_until(s, t("2026-01-01T01:30:00"), t("2026-01-01T04:30:00"), timedelta(minutes=1), timedelta(minutes=40))
    assert runs[:3] == [("full", t("2026-01-01T02:00:00")), ("incremental", t("2026-01-01T02:40:00")),
                        ("verify", t("2026-01-01T03:20:00"))]
    # incremental's 03:00 and 04:00 slots passed while others ran: coalesced, not queued twice
    assert [r for r in runs if r[0] == "incremental"] == [("incremental", t("2026-01-01T02:40:00")),
                                                           ("incremental", t("2026-01-01T04:00:00"))]
    starts = [r[1] for r in runs]
    assert all(b - a >= timedelta(minutes=40) for a, b in itertools.pairwise(starts))


def test_a_long_job_coalesces_its_own_slots() -> None:
    s = Scheduler({"logical": CronSchedule("*/5 * * * * *")}, t("2026-01-01T00:00:00"))
    runs = run_until(s, t("2026-01-01T00:00:00"), t("2026-01-01T00:01:00"), timedelta(seconds=1), timedelta(seconds=12))
    # slots every 5 s, each run 12 s: runs at 5, 20 (next slot after 17), 35, 50
    assert [r[1].second for r in runs] == [5, 20, 35, 50]


# --- failures and backoff --------------------------------------------------------------
def test_backoff_sequence() -> None:
    assert Backoff().sequence() == [30.0, 60.0, 120.0, 240.0]
    assert Backoff(base=30, cap=100, max_attempts=6).sequence() == [30.0, 60.0, 100.0, 100.0, 100.0]


def test_failures_retry_with_backoff_then_give_up_until_next_slot() -> None:
    s = Scheduler({"full": CronSchedule("0 2 * * *")}, t("2026-01-01T01:00:00"), backoff=Backoff(30, 2, 600, 4))
    runs = run_until(s, t("2026-01-01T01:00:00"), t("2026-01-02T03:00:00"), timedelta(seconds=1), fail={"full"})
    starts = [r[1] for r in runs]
    first_day = [x for x in starts if x.day == 1]
    assert first_day == [t("2026-01-01T02:00:00"), t("2026-01-01T02:00:30"), t("2026-01-01T02:01:30"), t("2026-01-01T02:03:30")]
    assert next(x for x in starts if x.day == 2) == t("2026-01-02T02:00:00")  # the next slot starts afresh


def test_retries_never_pass_the_next_slot() -> None:
    s = Scheduler({"logical": CronSchedule("*/5 * * * * *")}, t("2026-01-01T00:00:00"), backoff=Backoff(30, 2, 600, 5))
    job = s.next_job(t("2026-01-01T00:00:05"))
    assert job is not None
    decision = s.record("logical", t("2026-01-01T00:00:06"), ok=False)
    assert decision.reason == "gave up" and decision.due == t("2026-01-01T00:00:10")
    assert s.jobs["logical"].failures == 0


def test_retry_decision_and_success_resets() -> None:
    s = Scheduler({"full": CronSchedule("0 2 * * *")}, t("2026-01-01T01:00:00"))
    assert s.next_job(t("2026-01-01T02:00:00")) is not None
    d = s.record("full", t("2026-01-01T02:05:00"), ok=False)
    assert d.reason == "retry" and d.due == t("2026-01-01T02:05:30") and d.failures == 1
    assert s.next_job(t("2026-01-01T02:05:29")) is None
    assert s.next_job(t("2026-01-01T02:05:30")) is not None
    d = s.record("full", t("2026-01-01T02:06:00"), ok=True)
    assert d.reason == "next slot" and d.due == t("2026-01-02T02:00:00")
    assert s.jobs["full"].last_success_slot == t("2026-01-01T02:00:00") and s.jobs["full"].failures == 0
