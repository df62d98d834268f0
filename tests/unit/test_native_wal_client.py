"""The native async client ``saveit-wal-push`` (native/saveit-wal-push.c), built by setup.py.

It must answer exactly when ``wal_spool.acknowledged`` would (the same table) and hand every other
call to ``saveit-backup wal-push`` with the same arguments. Here a stand-in ``saveit-backup`` next to
a copy of the client records each hand-over, so a test sees which side answered.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from saveit_backup.ops.wal_async import Spool
from tests.unit.test_wal_push_unit import ACK_CASES, NAME, ack_case

CLIENT = Path(sys.executable).parent / "saveit-wal-push"
HANDED = 42  # the stand-in's exit status
STAND_IN = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/handed.args"
printf '%s' "${SAVEIT_WAITED_SINCE-}" > "$(dirname "$0")/handed.since"
exit 42
"""


def test_client_is_built() -> None:
    """Where a C compiler and OpenSSL's headers exist (CI installs both), the install built the client."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None or not os.path.exists("/usr/include/openssl/evp.h"):
        pytest.skip(f"no C compiler ({cc}) or no OpenSSL headers: saveit-wal-push is not built")
    assert CLIENT.exists(), f"{CLIENT} was not built: reinstall (pip install -e .) with gcc and libssl-dev"


@pytest.fixture
def client(tmp_path: Path) -> Path:
    if not CLIENT.exists():
        pytest.skip("saveit-wal-push is not built")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy2(CLIENT, bindir / "saveit-wal-push")
    (bindir / "saveit-backup").write_text(STAND_IN)
    (bindir / "saveit-backup").chmod(0o755)
    return bindir / "saveit-wal-push"


def run(client: Path, args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "SAVEIT_"))}
    return subprocess.run([str(client), *args], env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)


def handed_args(client: Path) -> list[str]:
    return (client.parent / "handed.args").read_text().splitlines()


@pytest.mark.parametrize(("args", "environ", "config_text", "ack", "expected"), ACK_CASES)
def test_answers_as_acknowledged_does(client: Path, tmp_path: Path, args: list[str], environ: dict[str, str],
                                      config_text: str | None, ack: str | None, expected: bool) -> None:
    spool, argv, env = ack_case(tmp_path, args, environ, config_text, ack)
    res = run(client, argv, env)
    if expected:
        assert res.returncode == 0, res.stderr
        assert not Path(spool.request(NAME)).exists()  # consumed
    else:
        assert res.returncode == HANDED, res.stderr
        assert handed_args(client) == ["wal-push", *argv]  # unchanged, for argparse and the full command
        assert Path(spool.request(NAME)).exists()


def test_default_spool_and_relative_paths_match_python(client: Path, tmp_path: Path) -> None:
    """No BACKUP_SPOOL_DIR: the spool named by SHA-256 of pg_wal's real path, as Spool.at computes it;
    a relative path with '..' and a symlinked pg_wal resolve as in Python."""
    (tmp_path / "real_wal").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pg_wal").symlink_to(tmp_path / "real_wal")
    spool = Spool.at("", str(tmp_path / "data" / "pg_wal"))
    assert spool.root.startswith("/var/tmp/saveit-spool-")
    try:
        spool.create()
        Path(spool.ok(NAME)).write_text("stored")
        Path(spool.request(NAME)).write_text("x")
        res = run(client, ["--async", f"sub/../data/./pg_wal//{NAME}"], {}, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert not Path(spool.request(NAME)).exists()
    finally:
        shutil.rmtree(spool.root, ignore_errors=True)


def _hold_lock(spool: Spool) -> int:
    fd = os.open(spool.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@pytest.mark.parametrize("outcome", ["stored", "error", "timeout", "worker gone"])
def test_waits_for_the_running_worker(client: Path, tmp_path: Path, outcome: str) -> None:
    """A running worker that has not pushed the file yet: the client asks (the request holds the file's
    absolute path), clears an earlier error, and waits; the worker's ack ends the call, anything else is
    handed over with SAVEIT_WAITED_SINCE, when the wait began, so --timeout counts from there."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    (tmp_path / "pg_wal").mkdir()
    path = tmp_path / "pg_wal" / NAME
    Path(spool.error(NAME)).write_text("{}")  # an earlier attempt's failure
    lock = _hold_lock(spool)
    released = False

    def worker() -> None:
        nonlocal released
        deadline = time.monotonic() + 10
        while not (Path(spool.request(NAME)).exists() and not Path(spool.error(NAME)).exists()):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert Path(spool.request(NAME)).read_text() == str(path)
        time.sleep(0.2)
        if outcome == "stored":
            Path(spool.ok(NAME)).write_text("stored")
        elif outcome == "error":
            Path(spool.error(NAME)).write_text('{"message": "bucket unreachable"}')
        elif outcome == "worker gone":
            os.close(lock)
            released = True

    answer = threading.Thread(target=worker)
    answer.start()
    started = time.monotonic()
    try:
        res = run(client, ["--async", "--timeout", "1.5", "pg_wal/" + NAME], {"BACKUP_SPOOL_DIR": spool.root}, cwd=tmp_path)
        took = time.monotonic() - started
    finally:
        answer.join()
        if not released:
            os.close(lock)
    if outcome == "stored":
        assert res.returncode == 0, res.stderr
        assert not Path(spool.request(NAME)).exists() and took < 1.4
        return
    assert res.returncode == HANDED, res.stderr
    since = float((client.parent / "handed.since").read_text())
    assert started - 0.5 < since < started + took  # the same clock as time.monotonic()
    assert took < 1.4 if outcome != "timeout" else 1.4 < took < 5


def test_no_worker_running_hands_over_at_once(client: Path, tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    res = run(client, ["--async", str(tmp_path / NAME)], {"BACKUP_SPOOL_DIR": spool.root, "SAVEIT_WAITED_SINCE": "12.5"})
    assert res.returncode == HANDED
    assert (client.parent / "handed.since").read_text() == ""  # no wait happened (an inherited value is dropped)
    assert not Path(spool.request(NAME)).exists()  # the full command asks (and starts the worker)


def test_hand_over_to_the_real_command(tmp_path: Path) -> None:
    """Next to the installed saveit-backup: a sync push is stored by the full command."""
    if not CLIENT.exists():
        pytest.skip("saveit-wal-push is not built")
    from tests.unit.test_wal_push_unit import segment

    seg = segment(tmp_path, 0x42, fill=7, name=NAME)
    repo = tmp_path / "repo"
    res = run(CLIENT, [str(seg)], {"BACKUP_REPOSITORY": f"file://{repo}"})
    assert res.returncode == 0, res.stderr
    assert any(p.name.startswith(NAME) for p in repo.rglob("*")), sorted(repo.rglob("*"))
