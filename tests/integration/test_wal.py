"""WAL archiving end to end: archive_command (sync and async), idempotency, wal-fetch, wal-receive.

Each cluster runs archive_mode=on with ``archive_command = 'BACKUP_CONFIG=cfg.toml <CLI> wal-push %p'``
and a large wal_keep_size, so the archived segments are still in pg_wal to compare with.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from saveit_backup.pg.cluster import Cluster, free_port
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository
from saveit_backup.storage.local import LocalStorage
from tests.fixtures.pg import CLI

pytestmark = pytest.mark.pg

SEG = 16 << 20


def _env(cluster: Cluster | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "AWS_", "PG", "DATABASE_URL"))}
    if cluster is not None:
        env.update(PGHOST=cluster.host, PGPORT=str(cluster.port), PGDATABASE="postgres", BACKUP_PG_BINDIR=cluster.bindir)
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, check=False, timeout=120)


def start_archiving_cluster(base: Path, settings: str, extra_args: str = "", push: str = f"{CLI} wal-push") -> tuple[Cluster, Path]:
    """A cluster whose archive_command (``push``) pushes into ``base/repo`` with the TOML ``settings``."""
    if os.geteuid() == 0:
        pytest.fail("run the tests as the postgres OS user")
    repo = base / "repo"
    cfg = base / "saveit.toml"
    cfg.write_text(f'repository = "file://{repo}"\n{settings}')
    cluster = Cluster(base / "data", free_port(), socket_dir=base)
    command = f"BACKUP_CONFIG={cfg} {push} {extra_args}%p"
    cluster.initdb(extra_conf={"archive_mode": "on", "archive_command": f"'{command}'", "wal_keep_size": "'2GB'"})
    cluster.start()
    return cluster, repo


def generate_segments(cluster: Cluster, n: int) -> None:
    cluster.psql("CREATE TABLE IF NOT EXISTS walgen (i int, pad text)")
    cluster.psql(f"DO $$ BEGIN FOR i IN 1..{n} LOOP INSERT INTO walgen VALUES (i, repeat('x', 100)); "
                 f"PERFORM pg_switch_wal(); END LOOP; END $$")


def wait_archived(cluster: Cluster, timeout: float = 45) -> list[str]:
    """Wait until nothing is .ready; return the archived (.done) names."""
    status = cluster.datadir / "pg_wal" / "archive_status"
    deadline = time.monotonic() + timeout
    while True:
        names = os.listdir(status)
        if not any(n.endswith(".ready") for n in names):
            return sorted(n[: -len(".done")] for n in names if n.endswith(".done"))
        if time.monotonic() > deadline:
            failed = cluster.psql("SELECT failed_count, last_failed_wal FROM pg_stat_archiver")
            raise AssertionError(f"archiving did not finish: {sorted(names)[:5]}..., failed: {failed}")
        time.sleep(0.1)


def repo_of(path: Path) -> Repository:
    return Repository(LocalStorage(path))


def plain(repo: Path, name: str) -> bytes:
    return b"".join(repo_of(repo).read_object(layout.wal_key(name)))


def wal_keys(repo: Path) -> set[str]:
    return {i.key.rsplit("/", 1)[1] for i in LocalStorage(repo).list(layout.WAL)}


def fake_segment(directory: Path, segno: int, fill: int, tli: int = 1) -> Path:
    name = f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, tli, segno * SEG, 0, 7_000_000_000, SEG, 8192)
    path = directory / name
    path.write_bytes(header + bytes([fill]) * (SEG - len(header)))
    return path


def kill_worker(spool: Path) -> None:
    try:
        os.kill(int((spool / "worker.pid").read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


# --- sync ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path, list[str]]]:
    base = tmp_path_factory.mktemp("walsync")
    cluster, repo = start_archiving_cluster(base, "")
    try:
        generate_segments(cluster, 12)
        cluster.psql("SELECT pg_backup_start('t', true); SELECT * FROM pg_backup_stop(false)")
        cluster.psql("SELECT pg_switch_wal()")
        done = wait_archived(cluster)
        yield cluster, repo, done
    finally:
        cluster.stop("immediate")


def test_sync_archive_stores_exact_segments(synced: tuple[Cluster, Path, list[str]]) -> None:
    cluster, repo, done = synced
    segments = [n for n in done if len(n) == 24]
    assert len(segments) >= 12
    assert any(n.endswith(".backup") for n in done)
    assert wal_keys(repo) == set(done)  # everything archived, nothing else
    for name in done:
        assert plain(repo, name) == (cluster.datadir / "pg_wal" / name).read_bytes(), name
    backup_file = next(n for n in done if n.endswith(".backup"))
    assert LocalStorage(repo).stat(f"wal/00000001/history/{backup_file}").size > 0
    assert (repo / "config.json").exists()  # auto-initialised on first push


def test_push_idempotent_mismatch_and_header_check(synced: tuple[Cluster, Path, list[str]], tmp_path: Path) -> None:
    cluster, repo, done = synced
    env = _env(BACKUP_REPOSITORY=f"file://{repo}")
    name = [n for n in done if len(n) == 24][3]
    source = cluster.datadir / "pg_wal" / name
    assert cli("wal-push", str(source), env=env).returncode == 0  # same content again: success

    stored_before = (repo / layout.wal_key(name)).read_bytes()
    changed = tmp_path / name
    data = bytearray(source.read_bytes())
    data[100_000] ^= 0xFF
    changed.write_bytes(bytes(data))
    res = cli("wal-push", str(changed), env=env)
    assert res.returncode == 16 and "SVB-700" in res.stderr, res.stderr
    assert (repo / layout.wal_key(name)).read_bytes() == stored_before  # never overwritten

    other = [n for n in done if len(n) == 24][5]
    misnamed = tmp_path / "misnamed"
    misnamed.mkdir()
    target = misnamed / f"{other[:16]}000000FE"  # content of `other` under another segment's name
    shutil.copy(cluster.datadir / "pg_wal" / other, target)
    res = cli("wal-push", str(target), env=env)
    assert res.returncode == 9 and "page address" in res.stderr, res.stderr
    assert target.name not in wal_keys(repo)

    history = tmp_path / "00000002.history"
    history.write_text("1\t0/5000000\tno recovery target specified\n")
    assert cli("wal-push", str(history), env=env).returncode == 0
    assert cli("wal-push", str(history), env=env).returncode == 0
    assert plain(repo, "00000002.history") == history.read_bytes()
    assert LocalStorage(repo).stat("wal/00000002/history/00000002.history").size > 0

    bad = cli("wal-push", str(tmp_path / "not-a-wal-name"), env=env)
    assert bad.returncode == 2


def test_wal_fetch(synced: tuple[Cluster, Path, list[str]], tmp_path: Path) -> None:
    cluster, repo, done = synced
    env = _env(BACKUP_REPOSITORY=f"file://{repo}")
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    missing = cli("wal-fetch", "0000000100000000000000F0", str(pg_wal / "RECOVERYXLOG"), env=env)
    assert missing.returncode == 1 and not (pg_wal / "RECOVERYXLOG").exists()
    assert cli("wal-fetch", "00000009.history", str(pg_wal / "RECOVERYHISTORY"), env=env).returncode == 1

    segments = [n for n in done if len(n) == 24]
    first = segments[1]
    dest = pg_wal / "RECOVERYXLOG"
    res = cli("wal-fetch", first, str(dest), "--prefetch", "4", env=env)
    assert res.returncode == 0, res.stderr
    assert dest.read_bytes() == (cluster.datadir / "pg_wal" / first).read_bytes()
    cache = pg_wal / ".saveit-prefetch"
    assert set(segments[2:6]) <= set(os.listdir(cache))
    # served from the cache: works even with an unusable repository configured
    res = cli("wal-fetch", segments[2], str(dest), env=_env(BACKUP_REPOSITORY="file:///nonexistent/repo"))
    assert res.returncode == 0, res.stderr
    assert dest.read_bytes() == (cluster.datadir / "pg_wal" / segments[2]).read_bytes()
    assert segments[2] not in os.listdir(cache)
    # a real failure is not "not found"
    res = cli("wal-fetch", segments[8], str(dest), env=_env(BACKUP_REPOSITORY=f"file://{repo}", BACKUP_COMPRESSION="nope"))
    assert res.returncode not in (0, 1)
    res = cli("wal-fetch", segments[8], str(dest), "--abort-on-error", env=_env(BACKUP_COMPRESSION="nope"))
    assert res.returncode == 255
    assert not [n for n in os.listdir(pg_wal) if n.endswith(".tmp-saveit")]


def test_encrypted_sync_push_derives_the_key_once_per_host(synced: tuple[Cluster, Path, list[str]], tmp_path: Path) -> None:
    """The second wal-push into a passphrase repository reads the KEK the first one cached, instead
    of running scrypt (made to fail in that process); what it wrote decrypts with a derived KEK."""
    cluster, _, done = synced
    segments = [cluster.datadir / "pg_wal" / n for n in done if len(n) == 24][:3]
    keys = tmp_path / "keys"
    env = _env(BACKUP_REPOSITORY=f"file://{tmp_path / 'repo'}", BACKUP_ENCRYPTION_PASSPHRASE="correct horse",
               BACKUP_KEY_CACHE_DIR=str(keys))
    no_scrypt = tmp_path / "no_scrypt"
    no_scrypt.mkdir()
    (no_scrypt / "sitecustomize.py").write_text(
        "import hashlib\n\ndef _refuse(*args, **kwargs):\n    raise RuntimeError('scrypt ran')\n\nhashlib.scrypt = _refuse\n")
    faulty = {**env, "PYTHONPATH": str(no_scrypt)}

    res = cli("wal-push", str(segments[0]), env=env)
    assert res.returncode == 0, res.stderr
    (entry,) = keys.iterdir()
    assert keys.stat().st_mode & 0o777 == 0o700 and entry.stat().st_mode & 0o777 == 0o600
    res = cli("wal-push", str(segments[1]), env=faulty)
    assert res.returncode == 0, res.stderr
    res = cli("wal-push", str(segments[2]), env={**faulty, "BACKUP_KEY_CACHE_DIR": "off"})  # the fault is real
    assert res.returncode != 0 and "scrypt ran" in res.stderr, res.stderr
    res = cli("wal-push", str(segments[2]), env={**faulty, "BACKUP_ENCRYPTION_PASSPHRASE": "wrong horse"})
    assert res.returncode != 0 and "scrypt ran" in res.stderr, res.stderr  # another passphrase: not from the cache

    for seg in segments[:2]:
        dest = tmp_path / "RECOVERYXLOG"
        res = cli("wal-fetch", seg.name, str(dest), "--prefetch", "0", env={**env, "BACKUP_KEY_CACHE_DIR": "off"})
        assert res.returncode == 0, res.stderr
        assert dest.read_bytes() == seg.read_bytes()
    res = cli("wal-fetch", segments[1].name, str(tmp_path / "x"), "--prefetch", "0",
              env={**env, "BACKUP_ENCRYPTION_PASSPHRASE": "wrong horse"})
    assert res.returncode == 10 and "SVB-" in res.stderr, res.stderr


# --- async ------------------------------------------------------------------------------------
@pytest.mark.parametrize("client", ["saveit-backup", "saveit-wal-push"])
def test_async_archive_stores_exact_segments(tmp_path: Path, client: str) -> None:
    """Async mode set in the config file (saveit-backup wal-push), or on the command line with the spool
    in the environment, as the native client answers it without the full command (saveit-wal-push)."""
    spool = tmp_path / "spool"
    if client == "saveit-backup":
        cluster, repo = start_archiving_cluster(tmp_path, f'archive_async = true\nspool_dir = "{spool}"\n')
    else:
        native = Path(CLI).parent / client
        if not native.exists():
            pytest.skip("saveit-wal-push is not built (test_native_wal_client.test_client_is_built says why)")
        cluster, repo = start_archiving_cluster(tmp_path, "", "--async ", push=f"BACKUP_SPOOL_DIR={spool} {native}")
    try:
        generate_segments(cluster, 30)
        done = wait_archived(cluster)
        segments = [n for n in done if len(n) == 24]
        assert len(segments) >= 30
        assert wal_keys(repo) == set(done)
        for name in done:
            assert plain(repo, name) == (cluster.datadir / "pg_wal" / name).read_bytes(), name
        log = (spool / "worker.log").read_text()
        assert "async WAL worker started" in log and "pushed" in log
        assert (spool / "dropped_total").exists() is False
    finally:
        kill_worker(spool)
        cluster.stop("immediate")


def test_async_queue_limit_drops_oldest(tmp_path: Path) -> None:
    """Storage down, 8 segments ready, queue max 3: the 5 oldest are dropped and reported as pushed."""
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    names = []
    for segno in range(3, 11):
        names.append(fake_segment(pg_wal, segno, segno).name)
        (pg_wal / "archive_status" / f"{names[-1]}.ready").touch()
    repo_parent = tmp_path / "locked"
    repo_parent.mkdir()
    repo_parent.chmod(0o500)  # the repository cannot be created: every push fails
    spool = tmp_path / "spool"
    env = _env(BACKUP_REPOSITORY=f"file://{repo_parent}/repo", BACKUP_SPOOL_DIR=str(spool), BACKUP_ARCHIVE_QUEUE_MAX="3")
    try:
        res = cli("wal-push", "--async", "--timeout", "20", str(pg_wal / names[0]), env=env)
        assert res.returncode == 0, res.stderr
        assert "DROPPED" in res.stderr  # loud in PostgreSQL's log
        assert (spool / "dropped_total").read_text().strip() == "5"
        for name in names[:5]:
            assert cli("wal-push", "--async", "--timeout", "5", str(pg_wal / name), env=env).returncode == 0
            (pg_wal / "archive_status" / f"{name}.ready").rename(pg_wal / "archive_status" / f"{name}.done")
        failed = cli("wal-push", "--async", "--timeout", "20", str(pg_wal / names[5]), env=env)
        assert failed.returncode not in (0, 1) and "async push failed" in failed.stderr
        assert "DROPPED" in (spool / "worker.log").read_text()

        repo_parent.chmod(0o700)  # storage back: the kept segments are pushed
        for name in names[5:]:
            res = cli("wal-push", "--async", "--timeout", "20", str(pg_wal / name), env=env)
            assert res.returncode == 0, res.stderr
        repo = repo_parent / "repo"
        assert wal_keys(repo) == set(names[5:])
        for name in names[5:]:
            assert plain(repo, name) == (pg_wal / name).read_bytes()
        status = cli("wal-async-status", "--pg-wal", str(pg_wal), env=env)
        assert '"dropped_total": 5' in status.stdout
    finally:
        repo_parent.chmod(0o700)
        kill_worker(spool)


# --- streaming ------------------------------------------------------------------------------
def test_wal_receive_stores_completed_segments(synced: tuple[Cluster, Path, list[str]], tmp_path: Path) -> None:
    cluster, _repo, _done = synced
    repo = tmp_path / "streamed"
    env = _env(cluster, BACKUP_REPOSITORY=f"file://{repo}")
    start = cluster.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    until = f"{start[:16]}{int(start[16:], 16) + 3:08X}"
    proc = subprocess.Popen([CLI, "--json", "wal-receive", "--slot", "saveit_test", "--staging", str(tmp_path / "staging"),
                             "--until-segment", until, "--timeout", "45"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while cluster.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'saveit_test' AND active") != "1":
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        # Streaming starts where the slot was created, which other WAL activity may have moved past ``start``.
        first = cluster.psql("SELECT pg_walfile_name(restart_lsn + 1) FROM pg_replication_slots WHERE slot_name = 'saveit_test'")
        generate_segments(cluster, 5)
        out, err = proc.communicate(timeout=50)
        assert proc.returncode == 0, err
        stored = sorted(n for n in wal_keys(repo) if len(n) == 24)
        assert until in stored and first in stored, (stored, err)
        for name in stored:
            assert plain(repo, name) == (cluster.datadir / "pg_wal" / name).read_bytes(), name
        assert not [n for n in os.listdir(tmp_path / "staging") if not n.endswith(".partial")]
        assert '"stored"' in out
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.psql("SELECT pg_drop_replication_slot('saveit_test') FROM pg_replication_slots WHERE slot_name = 'saveit_test'")
