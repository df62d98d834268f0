"""Schedule logic of the service: pure, no I/O, every method takes ``now``.

Cron expressions are evaluated in UTC with ``croniter``:

* five fields: ``minute hour day-of-month month day-of-week`` (standard cron; 0 and 7 are Sunday);
* six fields: **seconds first**, ``second minute hour day-of-month month day-of-week``
  (``*/5 * * * * *`` is every five seconds).  croniter's own default reads a sixth field as
  seconds at the *end*; we always pass ``second_at_beginning=True`` so that the form is the
  one used by Quartz/Spring and documented here;
* ``@hourly``, ``@daily``... aliases; an empty expression disables the job.

Rules (tested in tests/unit/test_scheduler.py with an injected clock):

* one job at a time: :meth:`Scheduler.next_job` returns the single job to run now (earliest due
  first, then by priority); slots of any job that pass while another job runs are coalesced
  into one run when the running job ends;
* catch-up: at start, a job whose latest slot before ``now`` is later than its last
  *successful* slot (persisted by the service) runs once, at once, however many slots it missed.
  A job never run before on this repository waits for its first slot;
* failures are retried with backoff (30 s, 1 min, 2 min... capped), at most ``max_attempts``
  runs per slot, and never past the job's next regular slot, which supersedes the retries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from saveit_backup.errors import ConfigError

# Order of precedence when several jobs are due together: backups first, then checks of them.
PRIORITY = ("full", "incremental", "logical", "verify", "restore_test")


def to_utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        raise ValueError("naive datetime: the scheduler works with aware datetimes in UTC")
    return ts.astimezone(UTC)


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression evaluated in UTC (5 fields, or 6 with seconds first)."""

    expr: str

    def __post_init__(self) -> None:
        from croniter import croniter

        text = " ".join(self.expr.split())
        object.__setattr__(self, "expr", text)
        fields = text.split(" ")
        if not text.startswith("@") and len(fields) not in (5, 6):
            raise ConfigError(f"cron expression {self.expr!r} must have 5 fields (minute hour day month weekday) "
                              "or 6 with seconds first (second minute hour day month weekday)")
        if not croniter.is_valid(text, second_at_beginning=True):
            raise ConfigError(f"cron expression {self.expr!r} is not valid")

    @property
    def has_seconds(self) -> bool:
        return len(self.expr.split(" ")) == 6

    def _iter(self, start: datetime) -> object:
        from croniter import croniter

        return croniter(self.expr, to_utc(start), second_at_beginning=True)

    def next_after(self, ts: datetime) -> datetime:
        """The first slot strictly after ``ts``."""
        it = self._iter(ts)
        return to_utc(it.get_next(datetime))  # type: ignore[attr-defined]

    def prev_before(self, ts: datetime) -> datetime:
        """The last slot strictly before ``ts``."""
        it = self._iter(ts)
        return to_utc(it.get_prev(datetime))  # type: ignore[attr-defined]

    def upcoming(self, ts: datetime, count: int) -> list[datetime]:
        it = self._iter(ts)
        return [to_utc(it.get_next(datetime)) for _ in range(count)]  # type: ignore[attr-defined]


def parse_schedules(pairs: Mapping[str, str]) -> dict[str, CronSchedule]:
    """Job name -> schedule for the non-empty expressions (empty disables)."""
    out: dict[str, CronSchedule] = {}
    for name, expr in pairs.items():
        if expr and expr.strip():
            try:
                out[name] = CronSchedule(expr)
            except ConfigError as exc:
                raise ConfigError(f"schedule of {name}: {exc.message}") from None
    return out


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts of one slot: base, base*factor, ... capped; ``max_attempts`` runs in all."""

    base: float = 30.0
    factor: float = 2.0
    cap: float = 600.0
    max_attempts: int = 5

    def delay(self, failures: int) -> float:
        """Delay after the ``failures``-th consecutive failure (1-based)."""
        return float(min(self.cap, self.base * self.factor ** (failures - 1)))

    def sequence(self) -> list[float]:
        return [self.delay(n) for n in range(1, self.max_attempts)]


@dataclass
class JobState:
    name: str
    schedule: CronSchedule
    due: datetime  # when it should run next (a slot, a retry, or a catch-up)
    slot: datetime  # the slot this next run serves
    last_success_slot: datetime | None = None
    failures: int = 0  # consecutive failures within ``slot``
    catch_up: bool = False
    retry: bool = False


@dataclass(frozen=True)
class Decision:
    """What happens after a run: the next due time and why."""

    job: str
    due: datetime
    reason: str  # "next slot", "retry", "gave up"
    failures: int


@dataclass
class Scheduler:
    schedules: Mapping[str, CronSchedule]
    now: datetime
    last_success: Mapping[str, datetime | None] = field(default_factory=dict)
    backoff: Backoff = field(default_factory=Backoff)
    jobs: dict[str, JobState] = field(init=False)

    def __post_init__(self) -> None:
        now = to_utc(self.now)
        self.jobs = {}
        for name, sched in self.schedules.items():
            last = self.last_success.get(name)
            last = to_utc(last) if last else None
            prev = sched.prev_before(now)
            if last is not None and prev > last:
                self.jobs[name] = JobState(name, sched, now, prev, last, catch_up=True)
            else:
                nxt = sched.next_after(now)
                self.jobs[name] = JobState(name, sched, nxt, nxt, last)

    def _order(self, name: str) -> int:
        return PRIORITY.index(name) if name in PRIORITY else len(PRIORITY)

    def next_job(self, now: datetime) -> JobState | None:
        """The one job to run now, or None. Earliest due first; ties by priority."""
        now = to_utc(now)
        due = [j for j in self.jobs.values() if j.due <= now]
        if not due:
            return None
        return min(due, key=lambda j: (j.due, self._order(j.name)))

    def next_wakeup(self) -> datetime | None:
        return min((j.due for j in self.jobs.values()), default=None)

    def record(self, name: str, now: datetime, ok: bool) -> Decision:
        """Account for a finished run of ``name`` at ``now``; returns its next due time."""
        now = to_utc(now)
        job = self.jobs[name]
        job.catch_up = False
        if ok:
            job.last_success_slot = job.slot
            job.failures = 0
            job.retry = False
            return self._advance(job, now, "next slot")
        job.failures += 1
        regular = job.schedule.next_after(max(now, job.slot))
        retry_at = now + timedelta(seconds=self.backoff.delay(job.failures))
        if job.failures < self.backoff.max_attempts and retry_at < regular:
            job.due = retry_at
            job.retry = True
            return Decision(name, retry_at, "retry", job.failures)
        failures = job.failures
        job.failures = 0
        job.retry = False
        decision = self._advance(job, now, "gave up")
        return Decision(name, decision.due, "gave up", failures)

    def _advance(self, job: JobState, now: datetime, reason: str) -> Decision:
        # Slots that passed while this job (or another) ran are coalesced: the next slot after now.
        nxt = job.schedule.next_after(now)
        job.due = nxt
        job.slot = nxt
        return Decision(job.name, nxt, reason, job.failures)

    def upcoming(self, name: str, count: int = 3) -> list[datetime]:
        job = self.jobs[name]
        rest = job.schedule.upcoming(job.due, count - 1) if count > 1 else []
        return [job.due, *rest][:count]


def next_runs(schedules: Mapping[str, CronSchedule], now: datetime, count: int = 3) -> dict[str, list[datetime]]:
    """Next ``count`` slots of each schedule after ``now`` (for status output)."""
    return {name: s.upcoming(now, count) for name, s in schedules.items()}


def ordered(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (PRIORITY.index(n) if n in PRIORITY else len(PRIORITY), n))
