"""Asynchronous archiving, the client side: the spool and ``wal-push --async``.

This is what PostgreSQL runs once per WAL file in async mode, so it imports almost nothing
(not even ``typing``): when the worker (``ops.wal_async``, which documents the spool layout) has
pushed the file ahead, ``acknowledged`` answers from the environment and one ``open``, before the
configuration and the CLI are loaded.
"""

from __future__ import annotations

import _thread
import fcntl
import os
import sys
import time

from saveit_backup import errors
from saveit_backup.errors import ConfigError, SaveitError, TransientStorageError
from saveit_backup.wal_args import async_requested

try:  # CPython's built-in SHA-256: the same digest as hashlib's without loading OpenSSL
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other interpreters
    from hashlib import sha256 as _sha256

TYPE_CHECKING = False  # typing costs milliseconds of every archive_command; mypy still reads this block
if TYPE_CHECKING:
    from types import SimpleNamespace
    from typing import Any

    from saveit_backup.config import Settings

DEFAULT_TIMEOUT = 60.0
FAST_WAIT = 10.0  # at most this much of --timeout is the cheap wait for a running worker; the full wal-push waits the rest
LOG_ROTATE_BYTES = 10 << 20
DROPPED = "dropped"


class Spool:
    """The spool of one cluster (layout in the module docstring of ``ops.wal_async``). A value object."""

    __slots__ = ("root",)

    def __init__(self, root: str) -> None:
        self.root = root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spool) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"Spool({self.root!r})"

    @classmethod
    def for_cluster(cls, settings: Settings, pg_wal: str) -> Spool:
        return cls.at(settings.spool_dir, pg_wal)

    @classmethod
    def at(cls, spool_dir: str, pg_wal: str) -> Spool:
        """``spool_dir`` (BACKUP_SPOOL_DIR) if set, else one per cluster under /var/tmp."""
        if spool_dir:
            return cls(os.path.abspath(spool_dir))
        digest = _sha256(os.path.realpath(pg_wal).encode()).hexdigest()[:12]
        return cls(f"/var/tmp/saveit-spool-{digest}")

    @property
    def requests(self) -> str:
        return os.path.join(self.root, "in")

    @property
    def status(self) -> str:
        return os.path.join(self.root, "status")

    def ok(self, name: str) -> str:
        return os.path.join(self.status, f"{name}.ok")

    def error(self, name: str) -> str:
        return os.path.join(self.status, f"{name}.error")

    def request(self, name: str) -> str:
        return os.path.join(self.requests, name)

    @property
    def lock_path(self) -> str:
        return os.path.join(self.root, "worker.lock")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.root, "worker.pid")

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "worker.log")

    @property
    def dropped_path(self) -> str:
        return os.path.join(self.root, "dropped_total")

    def create(self) -> None:
        for d in (self.root, self.requests, self.status):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def dropped_total(self) -> int:
        try:
            with open(self.dropped_path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def worker_running(self) -> bool:
        """True while some process holds the worker lock."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing releases a lock we may have taken
        return False


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{_thread.get_ident()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- client: wal-push --async -----------------------------------------------------------
class FastAck:
    """What ``acknowledged`` found: ``done`` (the worker pushed the file: exit 0 now), else, after a
    cheap wait for a running worker, when that wait began (``time.monotonic()``): the full wal-push
    then waits only the rest of ``--timeout`` and reports an error written meanwhile (the wait
    removed the earlier one before asking)."""

    __slots__ = ("done", "waited_since")

    def __init__(self, done: bool, waited_since: float | None = None) -> None:
        self.done = done
        self.waited_since = waited_since


def acknowledged(args: SimpleNamespace | None, environ: dict[str, str] | os._Environ[str]) -> FastAck:
    """``wal-push [--async] PATH`` (``args`` from ``wal_args.quick_args``) whose file the worker has
    pushed, now or while this call waits for the running worker: consume the ack, done.

    PostgreSQL's common case in async mode, answered before the configuration and the CLI load.
    Not done whenever anything needs them (``wal_args.async_requested`` says no: no ``--async`` nor
    BACKUP_ARCHIVE_ASYNC, --verbose, arguments quick_args could not parse; a config file that sets the
    spool; no worker running, a dropped or failed file, ``--timeout`` passed): the caller then runs
    the full ``wal-push``, which decides and reports.
    """
    if args is None or not async_requested(args, environ):  # async set only in a config file: the full wal-push
        return FastAck(False)
    config_file = args.wal_config or environ.get("BACKUP_CONFIG")
    spool_dir = environ.get("BACKUP_SPOOL_DIR")
    if config_file and spool_dir is None:
        try:
            with open(config_file, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            return FastAck(False)
        if "spool_dir" in text:
            return FastAck(False)
    path = os.path.abspath(args.path)
    name = os.path.basename(path)
    if not name or name.startswith("."):
        return FastAck(False)
    spool = Spool.at(spool_dir or "", os.path.dirname(path))
    status = _ack(spool, name)
    waited_since = _handed_over(environ)
    if status is None and waited_since is None and os.path.isdir(spool.requests) and spool.worker_running():
        waited_since = time.monotonic()
        status = _wait_running(spool, name, path, waited_since + min(FAST_WAIT, float(args.timeout)))
    if status != "pushed":
        return FastAck(False, waited_since)
    unlink_missing_ok(spool.request(name))
    return FastAck(True)


def _handed_over(environ: dict[str, str] | os._Environ[str]) -> float | None:
    """When the native client (native/saveit-wal-push.c) already waited for the running worker:
    ``time.monotonic()`` when that wait began (SAVEIT_WAITED_SINCE), so the wait is not repeated."""
    try:
        return float(environ["SAVEIT_WAITED_SINCE"])
    except (KeyError, ValueError):
        return None


def _ack(spool: Spool, name: str) -> str | None:
    """"pushed" or "dropped" once the worker wrote ``name``'s ack, else None."""
    try:
        with open(spool.ok(name)) as f:
            return DROPPED if f.read().strip() == DROPPED else "pushed"
    except OSError:
        return None


def _wait_running(spool: Spool, name: str, path: str, deadline: float) -> str | None:
    """Wait for the running worker's ack, still without the configuration and the CLI loaded.

    When PostgreSQL asks faster than the worker pushes (a backlog), every call waits: loading
    everything meanwhile would take CPU from the worker.  None as soon as anything needs the full
    ``wal-push`` (an error, the worker gone, ``deadline`` passed)."""
    unlink_missing_ok(spool.error(name))  # an earlier attempt's failure: wait for a fresh one, as push_async does
    write_atomic(spool.request(name), path)  # a file PostgreSQL has not marked .ready is pushed too
    next_check = time.monotonic() + 0.1
    while True:
        time.sleep(0.002)
        status = _ack(spool, name)
        if status is not None or os.path.exists(spool.error(name)):
            return status
        now = time.monotonic()
        if now >= deadline:
            return None
        if now >= next_check:
            if not spool.worker_running():
                return _ack(spool, name)
            next_check = now + 0.1


def push_async(settings: Settings, path: str, timeout: float = DEFAULT_TIMEOUT,
               cli_values: dict[str, Any] | None = None, config_file: str | None = None,
               waited_since: float | None = None) -> str:
    """Return "pushed" or "dropped" once the worker has handled ``path``; raise its error otherwise.

    ``waited_since``: ``FastAck.waited_since`` of this call's cheap wait, which started the timeout."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if not name or name.startswith("."):  # the worker checks the name fully; this keeps the spool's paths sane
        raise ConfigError(f"{name!r} is not a WAL file name", hint="archive_command must pass %p")
    pg_wal = os.path.dirname(path)
    spool = Spool.for_cluster(settings, pg_wal)
    spool.create()
    result = _consume(spool, name, errors_too=False)
    if result is not None:
        return result
    if waited_since is None:  # else the cheap wait cleared it already, and an error now is this attempt's
        unlink_missing_ok(spool.error(name))  # an earlier attempt's failure: wait for a fresh one (the worker retries now)
    write_atomic(spool.request(name), path)
    deadline = (time.monotonic() if waited_since is None else waited_since) + timeout
    next_check = 0.0
    delay = 0.005
    while True:
        result = _consume(spool, name)
        if result is not None:
            return result
        now = time.monotonic()
        if now >= deadline:
            raise TransientStorageError(f"asynchronous push of {name} did not finish within {timeout:.0f} s",
                                        hint=f"see the worker log {spool.log_path}; PostgreSQL retries the archive_command")
        if now >= next_check:
            if not spool.worker_running():
                start_worker(spool, pg_wal, cli_values or {}, config_file)
            next_check = now + 1.0
        time.sleep(delay)
        delay = min(delay * 1.5, 0.01)  # PostgreSQL waits on this call: look again soon


def _consume(spool: Spool, name: str, errors_too: bool = True) -> str | None:
    text = _ack(spool, name)
    if text is not None:
        unlink_missing_ok(spool.request(name))
        if text == DROPPED:
            print(f"saveit-backup: ERROR WAL file {name} was DROPPED by the archive queue limit (BACKUP_ARCHIVE_QUEUE_MAX): "
                  "it is NOT in the archive; point-in-time recovery across it is impossible until the next full backup",
                  file=sys.stderr)
            return DROPPED
        return "pushed"
    if not errors_too:
        return None
    try:
        with open(spool.error(name)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    import json

    try:
        body = json.loads(text)
    except ValueError:
        return None
    unlink_missing_ok(spool.error(name))
    unlink_missing_ok(spool.request(name))
    raise _rebuild_error(body)


def _rebuild_error(body: dict[str, Any]) -> SaveitError:
    cls = getattr(errors, str(body.get("kind", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, SaveitError)):
        cls = SaveitError
    return cls(f"async push failed: {body.get('message', '?')}", body.get("hint"))


def unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def start_worker(spool: Spool, pg_wal: str, cli_values: dict[str, Any], config_file: str | None) -> None:
    """Start a detached worker (new session, output to the spool's log); a second one exits at once."""
    args = [sys.executable, "-m", "saveit_backup.ops.wal_async", "--pg-wal", pg_wal, "--spool", spool.root]
    if config_file:
        args += ["--config", config_file]
    if cli_values.get("repository"):
        args += ["--repo", str(cli_values["repository"])]
    try:
        if os.path.getsize(spool.log_path) > LOG_ROTATE_BYTES:
            os.replace(spool.log_path, spool.log_path + ".1")
    except OSError:
        pass
    import subprocess

    with open(spool.log_path, "ab") as logf:
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, close_fds=True,
                         start_new_session=True, cwd="/")
