"""push_file / fetch / queue limit in-process, on a memory repository and fake segments."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from saveit_backup import config
from saveit_backup.errors import IntegrityError, WalMismatch, WalNotFound
from saveit_backup.ops.wal_async import DROPPED, Spool, Worker
from saveit_backup.ops.wal_fetch import _next_names, fetch
from saveit_backup.ops.wal_push import push_file
from saveit_backup.repo.repository import Repository
from saveit_backup.storage.memory import MemoryStorage

SEG = 16 << 20


def segment(directory: Path, segno: int, fill: int = 0, name: str | None = None) -> Path:
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, segno * SEG, 0, 1, SEG, 8192)
    path = directory / (name or f"00000001{segno // 256:08X}{segno % 256:08X}")
    path.write_bytes(header + bytes([fill]) * (SEG - len(header)))
    return path


@pytest.fixture
def repo() -> Repository:
    r = Repository(MemoryStorage())
    r.init()
    return r


def test_push_is_idempotent_and_refuses_other_content(repo: Repository, tmp_path: Path) -> None:
    seg = segment(tmp_path, 5, fill=1)
    assert push_file(repo, str(seg)).status == "stored"
    assert push_file(repo, str(seg)).status == "exists"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(WalMismatch):
        push_file(repo, str(segment(other, 5, fill=2)))
    with pytest.raises(IntegrityError):
        push_file(repo, str(segment(other, 5, name="000000010000000000000006")))


def test_fetch_prefetches_next_segments(repo: Repository, tmp_path: Path) -> None:
    for n in range(5, 9):
        push_file(repo, str(segment(tmp_path, n, fill=n)))
    dest_dir = tmp_path / "pg_wal"
    dest_dir.mkdir()
    result = fetch(repo, "000000010000000000000005", str(dest_dir / "RECOVERYXLOG"), prefetch=5)
    assert result.prefetched == 3
    assert fetch(repo, "000000010000000000000006", str(dest_dir / "RECOVERYXLOG")).source == "cache"
    assert (dest_dir / "RECOVERYXLOG").read_bytes() == (tmp_path / "000000010000000000000006").read_bytes()
    with pytest.raises(WalNotFound):
        fetch(repo, "000000010000000000000010", str(dest_dir / "RECOVERYXLOG"), prefetch=0)


def test_next_names_cross_log_boundary() -> None:
    assert _next_names("0000000100000000000000FF", 2, SEG) == ["000000010000000100000000", "000000010000000100000001"]
    assert _next_names("00000002000000000000003F", 1, 64 << 20) == ["000000020000000100000000"]


def test_queue_limit_drops_oldest_segments_only(tmp_path: Path) -> None:
    settings = config.load({"spool_dir": str(tmp_path / "spool"), "archive_queue_max": 2}, environ={})
    worker = Worker(settings, Spool.for_cluster(settings, str(tmp_path)), str(tmp_path), jobs=1, idle_exit=0)
    worker.spool.create()
    pending = {n: "" for n in ["000000010000000000000003", "000000010000000000000004", "00000002.history",
                               "000000010000000000000005"]}
    kept = worker._apply_queue_limit(dict(pending), inflight=0)
    assert sorted(kept) == ["000000010000000000000005", "00000002.history"]
    assert Path(worker.spool.ok("000000010000000000000003")).read_text() == DROPPED
    assert worker.spool.dropped_total() == 2


def test_recipient_only_writer_compares_by_header_hash(tmp_path: Path) -> None:
    """A host holding only public keys cannot decrypt what it archived, yet a repeated push is still checked."""
    from saveit_backup.pipeline.crypto import Keyring, generate_identity, parse_public_key

    _, public = generate_identity()
    storage = MemoryStorage()
    writer = Repository(storage, Keyring(recipients=[parse_public_key(public)]))
    writer.init()
    seg = segment(tmp_path, 7, fill=3)
    assert push_file(writer, str(seg)).status == "stored"
    assert push_file(writer, str(seg)).status == "exists"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(WalMismatch):
        push_file(writer, str(segment(other, 7, fill=4)))


# --- the async client's fast acknowledgement ---------------------------------------------------
NAME = "000000010000000000000042"


# (wal-push arguments, environment, config file text, the ack's content, acknowledged without the full
# command); test_native_wal_client runs the same table through the native client.
ACK_CASES = [
    (["--async", "{path}"], {}, None, "stored", True),
    (["{path}", "--async", "--timeout", "5", "--repo=file:///r"], {}, None, "stored", True),
    (["{path}"], {"BACKUP_ARCHIVE_ASYNC": "true"}, None, "stored", True),
    (["{path}"], {}, None, "stored", False),  # sync push: never acknowledged here
    (["{path}"], {"BACKUP_CONFIG": "{cfg}"}, "archive_async = true\n", "stored", False),  # the file decides: full path
    (["--async", "{path}"], {"BACKUP_CONFIG": "{cfg}"}, 'repository = "file:///r"\n', "stored", True),
    (["--async", "{path}"], {"BACKUP_CONFIG": "{cfg}"}, 'spool_dir = "/elsewhere"\n', "stored", False),
    (["--async", "{path}"], {}, None, DROPPED, False),  # the full path reports a dropped file
    (["--async", "{path}"], {}, None, None, False),  # not pushed yet
    (["--async", "-v", "{path}"], {}, None, "stored", False),
    (["--async", "--unknown", "{path}"], {}, None, "stored", False),
    (["--async", "{path}", "extra"], {}, None, "stored", False),
    (["--async", "--config"], {}, None, "stored", False),
    (["--async=yes", "{path}"], {}, None, "stored", False),
    (["--timeout=5", "--", "{path}"], {"BACKUP_ARCHIVE_ASYNC": " On "}, None, "exists", True),
]


def ack_case(tmp_path: Path, args: list[str], environ: dict[str, str], config_text: str | None,
             ack: str | None) -> tuple[Spool, list[str], dict[str, str]]:
    """An ACK_CASES row set up under ``tmp_path``: (the spool, wal-push's arguments, the environment)."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    path, cfg = str(tmp_path / "pg_wal" / NAME), str(tmp_path / "saveit.toml")
    if config_text is not None:
        Path(cfg).write_text(config_text)
    if ack is not None:
        Path(spool.ok(NAME)).write_text(ack)
    Path(spool.request(NAME)).write_text(path)
    env = {"BACKUP_SPOOL_DIR": spool.root, **{k: v.format(cfg=cfg) for k, v in environ.items()}}
    if config_text is not None and "spool_dir" in config_text:
        del env["BACKUP_SPOOL_DIR"]
    return spool, [a.format(path=path) for a in args], env


@pytest.mark.parametrize(("args", "environ", "config_text", "ack", "expected"), ACK_CASES)
def test_acknowledged(tmp_path: Path, args: list[str], environ: dict[str, str], config_text: str | None, ack: str | None,
                      expected: bool) -> None:
    from saveit_backup.ops.wal_spool import acknowledged
    from saveit_backup.wal_args import quick_args

    spool, argv, env = ack_case(tmp_path, args, environ, config_text, ack)
    assert acknowledged(quick_args(["wal-push", *argv]), env).done is expected
    assert Path(spool.request(NAME)).exists() is not expected  # an acknowledged request is consumed


@pytest.mark.parametrize("mapped", [True, False])
def test_push_paths_store_the_same_bytes(repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool) -> None:
    """Files up to BUFFERED_MAX are compressed in one call per frame (mapped, or read into a reused buffer),
    bigger ones stream; all read back equal, and the CPU slot is given back, on errors too."""
    import threading

    import zstandard

    from saveit_backup.ops import wal_push
    from saveit_backup.pipeline.envelope import _Reader, describe, read_header
    from saveit_backup.repo.layout import wal_key

    def body(name: str) -> bytes:
        reader = _Reader(repo.storage.open(wal_key(name)))
        read_header(reader, name)
        return b"".join(reader.rest())

    empty = tmp_path / "00000003.history"
    empty.touch()
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    cpu = threading.BoundedSemaphore(1)
    for path in (segment(tmp_path, 9, fill=7), history, segment(tmp_path, 12, fill=9), empty):
        assert push_file(repo, str(path), cpu=cpu, mapped=mapped).status == "stored"
        assert b"".join(repo.read_object(wal_key(path.name))) == path.read_bytes()
        if path.stat().st_size > 4 << 20:  # frames of 4 MiB, each compressed in one call
            assert describe(repo.storage.open(wal_key(path.name)))["zstd_frame"] == 4 << 20
            assert zstandard.get_frame_parameters(body(path.name)).content_size == 4 << 20
        else:
            assert "zstd_frame" not in describe(repo.storage.open(wal_key(path.name)))
            assert zstandard.get_frame_parameters(body(path.name)).content_size == path.stat().st_size  # one frame
    assert cpu.acquire(blocking=False)  # given back after each push
    cpu.release()
    monkeypatch.setattr(wal_push, "BUFFERED_MAX", 1 << 20)
    (tmp_path / "s").mkdir()
    streamed = segment(tmp_path / "s", 10, fill=8)
    assert push_file(repo, str(streamed), cpu=cpu, mapped=mapped).status == "stored"
    assert b"".join(repo.read_object(wal_key(streamed.name))) == streamed.read_bytes()
    assert describe(repo.storage.open(wal_key(streamed.name)))["zstd_frame"] == 4 << 20  # streamed: 4 MiB frames
    assert push_file(repo, str(streamed), cpu=cpu).status == "exists"
    assert cpu.acquire(blocking=False)
    cpu.release()

    def broken(*_: object, **__: object) -> bytes:
        raise OSError("disk gone")

    monkeypatch.setattr(wal_push, "BUFFERED_MAX", 64 << 20)
    monkeypatch.setattr("saveit_backup.pipeline.envelope.encode_buffer", broken)
    with pytest.raises(OSError):
        push_file(repo, str(segment(tmp_path / "s", 11)), cpu=cpu, mapped=mapped)
    assert cpu.acquire(blocking=False)  # given back on errors too


def _hold_worker_lock(spool: Spool) -> int:
    import fcntl
    import os

    fd = os.open(spool.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@pytest.mark.parametrize("outcome", ["ok", "error"])
def test_client_waits_cheaply_for_a_running_worker(tmp_path: Path, outcome: str) -> None:
    """A running worker that has not pushed the file yet: the client asks and waits without loading the
    configuration; a fresh error is left for the full wal-push, which reports it at once."""
    import json
    import os
    import threading

    from saveit_backup.errors import TransientStorageError
    from saveit_backup.ops.wal_spool import acknowledged, push_async
    from saveit_backup.wal_args import quick_args

    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    path = str(tmp_path / "pg_wal" / NAME)
    Path(spool.error(NAME)).write_text("{}")  # an earlier attempt's failure: cleared, never reported
    lock = _hold_worker_lock(spool)

    def worker() -> None:  # answers once the request is there, as the worker does
        for _ in range(2000):
            if Path(spool.request(NAME)).exists() and not Path(spool.error(NAME)).exists():
                break
            threading.Event().wait(0.005)
        if outcome == "ok":
            Path(spool.ok(NAME)).write_text("stored")
        else:
            body = {"code": "SVB-203", "kind": "TransientStorageError", "message": "bucket unreachable", "hint": "", "exit_status": 5}
            Path(spool.error(NAME)).write_text(json.dumps(body))

    answer = threading.Thread(target=worker)
    answer.start()
    try:
        ack = acknowledged(quick_args(["wal-push", "--async", path]), {"BACKUP_SPOOL_DIR": spool.root})
        answer.join()
        assert ack.done is (outcome == "ok")
        if outcome == "ok":
            assert not Path(spool.request(NAME)).exists()  # consumed
            return
        assert Path(spool.error(NAME)).exists() and ack.waited_since is not None
        settings = config.load({"spool_dir": spool.root}, environ={})
        with pytest.raises(TransientStorageError, match="bucket unreachable"):
            push_async(settings, path, timeout=5, waited_since=ack.waited_since)
    finally:
        os.close(lock)


def test_cheap_wait_keeps_to_the_timeout_and_notices_the_worker_leaving(tmp_path: Path) -> None:
    """A running worker that never answers: the cheap wait and the full wait together end at --timeout;
    a worker that exits mid-wait hands over to the full wal-push at once."""
    import os
    import threading
    import time

    from saveit_backup.errors import TransientStorageError
    from saveit_backup.ops.wal_spool import acknowledged, push_async
    from saveit_backup.wal_args import quick_args

    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    path = str(tmp_path / "pg_wal" / NAME)
    lock = _hold_worker_lock(spool)
    started = time.monotonic()
    try:
        ack = acknowledged(quick_args(["wal-push", "--async", "--timeout", "0.5", path]), {"BACKUP_SPOOL_DIR": spool.root})
        assert not ack.done and ack.waited_since is not None and 0.4 < time.monotonic() - started < 2
        settings = config.load({"spool_dir": spool.root}, environ={})
        with pytest.raises(TransientStorageError, match="did not finish"):
            push_async(settings, path, timeout=0.5, waited_since=ack.waited_since)
        assert time.monotonic() - started < 2  # not a second full timeout
    finally:
        os.close(lock)
    lock = _hold_worker_lock(spool)
    threading.Timer(0.3, os.close, (lock,)).start()  # the worker exits
    started = time.monotonic()
    ack = acknowledged(quick_args(["wal-push", "--async", path]), {"BACKUP_SPOOL_DIR": spool.root})
    assert not ack.done and time.monotonic() - started < 2  # not the 10 s cheap wait


def test_wal_fetch_serves_the_prefetch_cache_before_loading_anything(tmp_path: Path) -> None:
    """A prefetched file is renamed into place even where the configuration could not load; a miss
    still goes through the full wal-fetch (here: its configuration error, not exit 1)."""
    import subprocess
    import sys

    from saveit_backup.ops.wal_cache import PREFETCH_DIR

    pg_wal = tmp_path / "pg_wal"
    (pg_wal / PREFETCH_DIR).mkdir(parents=True)
    (pg_wal / PREFETCH_DIR / NAME).write_bytes(b"segment bytes")
    (pg_wal / PREFETCH_DIR / "000000010000000000000041").write_bytes(b"older: recovery is past it")
    env = {"PATH": "/usr/bin:/bin", "BACKUP_REPOSITORY": "nosuchscheme://x", "HOME": str(tmp_path)}

    def fetch_cli(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-X", "importtime", "-m", "saveit_backup", "wal-fetch", name,
                               str(pg_wal / "RECOVERYXLOG")], env=env, capture_output=True, text=True, timeout=60)

    hit = fetch_cli(NAME)
    assert hit.returncode == 0, hit.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in hit.stderr.splitlines() if line.startswith("import time:")}
    assert "saveit_backup.ops.wal_cache" in imported
    assert not imported & {"saveit_backup.cli_wal", "saveit_backup.config", "saveit_backup.ops.wal_fetch", "typing"}
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == b"segment bytes"
    assert sorted(p.name for p in (pg_wal / PREFETCH_DIR).iterdir()) == []  # served, and the older one dropped
    miss = fetch_cli("000000010000000000000043")
    assert miss.returncode not in (0, 1) and "nosuchscheme" in miss.stderr
    assert "saveit_backup.cli_wal" in miss.stderr  # the full wal-fetch ran


@pytest.mark.parametrize("how", ["env", "config", "encrypted"])
def test_sync_push_loads_only_the_push_path(tmp_path: Path, how: str) -> None:
    """archive_command runs once per WAL file: a sync push of a new segment into a local repository loads
    zstd's C backend without its package (platform, typing's share) and no thread, date, logging, dataclass
    or hashing machinery (an encrypted push: not the standard library's OpenSSL either, the key coming
    from the key cache), nor the async spool.  The first push initialises the repository, which may load more."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BACKUP_REPOSITORY": f"file://{tmp_path / 'repo'}"}
    if how == "config":  # as the README's archive_command: the settings in a file, read without tomllib
        (tmp_path / "saveit.toml").write_text(f'# archive\nrepository = "file://{tmp_path / "repo"}"\ncompression_level = 3\n')
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BACKUP_CONFIG": str(tmp_path / "saveit.toml")}
    if how == "encrypted":
        env |= {"BACKUP_ENCRYPTION_PASSPHRASE": "import test", "BACKUP_KEY_CACHE_DIR": str(tmp_path / "keys")}

    def push_cli(path: Path) -> set[str]:
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "saveit_backup", "wal-push", str(path)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}

    push_cli(segment(tmp_path, 9, fill=7))
    imported = push_cli(segment(tmp_path, 10, fill=3))
    assert {"saveit_backup.ops.wal_push", "saveit_backup.storage.local"} <= imported  # (the backend is loaded outside the import log)
    assert not imported & {"zstandard", "platform", "threading", "datetime", "logging", "dataclasses", "hashlib", "argparse",
                           "saveit_backup.domain.manifest", "saveit_backup.cli", "saveit_backup.ops.wal_spool",
                           "saveit_backup.domain.timeline", "tomllib", "hmac", "_hashlib"}
    assert ("cryptography.hazmat.primitives.ciphers.aead" in imported) == (how == "encrypted")
    from saveit_backup.repo.layout import wal_key
    from saveit_backup.storage.local import LocalStorage

    stored = Repository(LocalStorage(str(tmp_path / "repo")))
    if how == "encrypted":
        from saveit_backup.pipeline.crypto import Keyring

        stored = Repository(LocalStorage(str(tmp_path / "repo")), Keyring(passphrase="import test"))
        stored.load_config()
    for name in ("000000010000000000000009", "00000001000000000000000A"):
        assert b"".join(stored.read_object(wal_key(name))) == (tmp_path / name).read_bytes()
