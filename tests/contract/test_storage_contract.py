"""One contract suite for every storage backend, plus backend-specific checks.

The ``storage`` fixture runs each contract test against memory, local (tmp_path),
S3 (moto over real HTTP) and wrapped local storage.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from saveit_backup.errors import (
    AccessDenied,
    AlreadyExists,
    BucketNotFound,
    ConfigError,
    NotFound,
    PermanentStorageError,
    TransientStorageError,
)
from saveit_backup.storage import local as local_storage
from saveit_backup.storage.base import Data, ObjectInfo, Storage, read_all
from saveit_backup.storage.local import LocalStorage
from saveit_backup.storage.memory import MemoryStorage
from saveit_backup.storage.registry import open_storage
from saveit_backup.storage.s3 import S3Options, S3Storage
from saveit_backup.storage.wrappers import FaultyStorage, InjectedCrash, LimitedStorage, RetryingStorage
from tests.fixtures.s3 import S3Server, s3_options

MiB = 1 << 20
PART = 5 * MiB  # S3 part size in these tests: the S3 minimum, so 40 MiB is 8 parts
BIG = 40 * MiB


class ProducerFailed(Exception):
    """Raised by test generators to simulate a failing producer."""


def pattern(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def stream(total: int, chunk: int = MiB, seed: int = 7) -> Iterator[bytes]:
    """Deterministic pseudo-random chunks, generated lazily (bounded memory)."""
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield rng.randbytes(n)
        sent += n


def digest(chunks: Data) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    for c in [chunks] if isinstance(chunks, bytes) else chunks:
        h.update(c)
        size += len(c)
    return size, h.hexdigest()


def failing_stream(good_bytes: int) -> Iterator[bytes]:
    yield from stream(good_bytes)
    raise ProducerFailed("producer died")


def keys(storage: Storage, prefix: str = "") -> list[str]:
    return [info.key for info in storage.list(prefix)]


# --- backends --------------------------------------------------------------------

BACKENDS = ["memory", "local", "s3", "retry-limit-local"]


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    kind = request.param
    if kind == "memory":
        return MemoryStorage()
    if kind == "local":
        return LocalStorage(tmp_path / "repo")
    if kind == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        return S3Storage(bucket, "repo/base", s3_options(server, part_size=PART, max_parallel_parts=2))
    if kind == "retry-limit-local":
        return RetryingStorage(LimitedStorage(LocalStorage(tmp_path / "repo"), 4), sleep=lambda _s: None)
    raise AssertionError(kind)


@pytest.fixture
def s3(s3_server: S3Server, s3_bucket: str) -> S3Storage:
    return S3Storage(s3_bucket, "repo", s3_options(s3_server, part_size=PART, max_parallel_parts=2))


# --- the contract ----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", iter([]), iter([b"", b""])], ids=["bytes", "empty-iter", "empty-chunks"])
def test_empty_round_trip(storage: Storage, data: Data) -> None:
    storage.put("obj/empty", data)
    assert read_all(storage, "obj/empty") == b""
    assert storage.stat("obj/empty").size == 0


def test_small_round_trip(storage: Storage) -> None:
    storage.put("obj/small", b"hello world")
    assert read_all(storage, "obj/small") == b"hello world"
    info = storage.stat("obj/small")
    assert isinstance(info, ObjectInfo)
    assert (info.key, info.size) == ("obj/small", 11)


def test_large_streamed_round_trip(storage: Storage) -> None:
    storage.put("obj/big", stream(BIG))
    assert storage.stat("obj/big").size == BIG
    largest = 0

    def observed() -> Iterator[bytes]:
        nonlocal largest
        for chunk in storage.open("obj/big"):
            largest = max(largest, len(chunk))
            yield chunk

    assert digest(observed()) == digest(stream(BIG))
    assert largest <= 16 * MiB, "open must stream in bounded chunks"


def test_range_reads(storage: Storage) -> None:
    body = pattern(3 * MiB + 17)
    storage.put("obj/ranged", body)

    def read(offset: int, length: int | None = None) -> bytes:
        return b"".join(storage.open("obj/ranged", offset, length))

    assert read(0, 10) == body[:10]
    assert read(5, 100) == body[5:105]
    assert read(MiB - 3, 2 * MiB) == body[MiB - 3 : 3 * MiB - 3]  # crosses chunk boundaries
    assert read(3 * MiB) == body[3 * MiB :]
    assert read(len(body) - 5, 1000) == body[-5:]  # past the end: truncated
    assert read(len(body)) == b""  # offset at the end: empty
    assert read(len(body) + 10) == b""
    assert read(10, 0) == b""


def test_stat_size(storage: Storage) -> None:
    storage.put("a/one", b"x" * 1234)
    assert storage.stat("a/one").size == 1234


def test_list_by_prefix_sorted(storage: Storage) -> None:
    for key in ["a/2", "b/1", "a/10", "ab/x", "a/1", "a/sub/3"]:
        storage.put(key, key.encode())
    assert keys(storage, "a/") == ["a/1", "a/10", "a/2", "a/sub/3"]
    assert keys(storage, "a") == ["a/1", "a/10", "a/2", "a/sub/3", "ab/x"]
    assert keys(storage, "a/1") == ["a/1", "a/10"]
    assert keys(storage, "a/sub/") == ["a/sub/3"]
    assert keys(storage, "") == ["a/1", "a/10", "a/2", "a/sub/3", "ab/x", "b/1"]
    assert keys(storage, "nope/") == []
    sizes = {info.key: info.size for info in storage.list("b/")}
    assert sizes == {"b/1": 3}


def test_delete_is_idempotent(storage: Storage) -> None:
    storage.put("d/x", b"1")
    storage.delete("d/x")
    with pytest.raises(NotFound):
        storage.stat("d/x")
    storage.delete("d/x")
    storage.delete("d/never-existed")
    assert keys(storage, "d/") == []


@pytest.mark.parametrize("size", [100, 12 * MiB], ids=["small", "multipart"])
def test_if_absent_refuses_existing_and_keeps_content(storage: Storage, size: int) -> None:
    storage.put("w/once", b"original", if_absent=True)
    with pytest.raises(AlreadyExists):
        storage.put("w/once", b"replacement", if_absent=True)
    with pytest.raises(AlreadyExists):
        storage.put("w/once", stream(size), if_absent=True)
    assert read_all(storage, "w/once") == b"original"
    assert keys(storage, "w/") == ["w/once"], "no temporary objects may be visible"


def test_if_absent_stores_new_stream(storage: Storage) -> None:
    size = 12 * MiB  # more than one S3 part: exercises the hidden-temp + copy-if-not-exists path
    storage.put("w/new", stream(size), if_absent=True)
    assert digest(storage.open("w/new")) == digest(stream(size))
    assert keys(storage, "w/") == ["w/new"]


def test_missing_key_raises_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound):
        storage.open("missing/key")  # raised by open itself, not by the first read
    with pytest.raises(NotFound):
        storage.open("missing/key", 10, 5)
    with pytest.raises(NotFound):
        storage.stat("missing/key")


def test_overwrite_replaces(storage: Storage) -> None:
    storage.put("o/k", b"first")
    storage.put("o/k", b"second and longer")
    assert read_all(storage, "o/k") == b"second and longer"
    storage.put("o/k", stream(7 * MiB))
    assert digest(storage.open("o/k")) == digest(stream(7 * MiB))


@pytest.mark.parametrize("good_bytes", [100, 3 * MiB, 12 * MiB], ids=["tiny", "one-part", "multipart"])
def test_failing_streamed_put_leaves_nothing(storage: Storage, good_bytes: int) -> None:
    with pytest.raises(ProducerFailed):
        storage.put("f/partial", failing_stream(good_bytes))
    with pytest.raises(NotFound):
        storage.stat("f/partial")
    assert keys(storage, "f/") == []


def test_failing_streamed_put_keeps_previous_content(storage: Storage) -> None:
    storage.put("f/kept", b"previous")
    with pytest.raises(ProducerFailed):
        storage.put("f/kept", failing_stream(12 * MiB))
    with pytest.raises((ProducerFailed, AlreadyExists)):  # a backend may refuse before reading
        storage.put("f/kept", failing_stream(12 * MiB), if_absent=True)
    assert read_all(storage, "f/kept") == b"previous"
    assert keys(storage, "f/") == ["f/kept"]


def test_injected_crash_mid_put_leaves_nothing(storage: Storage) -> None:
    faulty = FaultyStorage(storage)
    faulty.crash_put_after(6 * MiB)
    with pytest.raises(InjectedCrash):
        faulty.put("c/crashed", stream(20 * MiB))
    with pytest.raises(NotFound):
        storage.stat("c/crashed")
    faulty.put("c/crashed", stream(MiB))  # the fault fired once
    assert storage.stat("c/crashed").size == MiB


def test_capabilities_exposed(storage: Storage) -> None:
    assert storage.capabilities.atomic_if_absent is True
    assert storage.capabilities.url


# --- local backend ---------------------------------------------------------------


def test_local_files_are_private_and_no_temp_files_left(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    local = LocalStorage(root)
    local.put("x/a", b"1")
    local.put("x/b", stream(3 * MiB), if_absent=True)
    with pytest.raises(ProducerFailed):
        local.put("x/c", failing_stream(2 * MiB))
    with pytest.raises(AlreadyExists):
        local.put("x/a", b"2", if_absent=True)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["x/a", "x/b"]
    for name in files:
        assert stat_mod.S_IMODE((root / name).stat().st_mode) == 0o600


def _skip_without_o_direct(directory: Path) -> None:
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        pytest.skip(f"the file system of {directory} refuses O_DIRECT")
    finally:
        (directory / "probe").unlink(missing_ok=True)


def _direct_puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the temporary files LocalStorage opened with O_DIRECT."""
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            opened.append(os.path.basename(str(path)))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(local_storage.os, "open", spy)
    return opened


@pytest.mark.parametrize("shape", ["bytes", "memoryview", "chunks"])
def test_local_big_objects_written_directly_byte_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    """Objects of DIRECT_MIN and more skip the page cache: pieces of an aligned buffer, the tail padded and cut."""
    _skip_without_o_direct(tmp_path)
    opened = _direct_puts(monkeypatch)
    local = LocalStorage(tmp_path / "repo")
    sizes = (local_storage.DIRECT_MIN, 3 * MiB + 4097, 5 * MiB)
    for size in sizes:
        body = pattern(size)
        data: Data = {"bytes": body, "memoryview": memoryview(body),
                      "chunks": iter([body[:1], b"", memoryview(body)[1 : size // 3], body[size // 3 :]])}[shape]
        local.put(f"d/{size}", data)
        assert read_all(local, f"d/{size}") == body
        assert (tmp_path / "repo" / "d" / str(size)).stat().st_size == size
    local.put("d/small", b"x" * (local_storage.DIRECT_MIN - 1))
    assert len(opened) == 3 and local.direct  # ext4 here takes O_DIRECT; the small object went through the cache
    assert sorted(os.listdir(tmp_path / "repo" / "d")) == sorted(["small", *map(str, sizes)])  # no temporary file left


def test_local_direct_refused_falls_back_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system refusing O_DIRECT at open (after creating the file), or a device refusing a write as
    misaligned after a first one went through (the rest through the cache): the object is byte-exact, and
    later objects go through the cache."""
    _skip_without_o_direct(tmp_path)
    real_open, real_write = os.open, os.pwrite
    body = pattern(2 * MiB + 5)

    def open_refusing(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, *args, **kw))  # Linux creates the file first
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(local_storage.os, "open", open_refusing)
    local = LocalStorage(tmp_path / "a")
    local.put("k", body, if_absent=True)
    assert read_all(local, "k") == body and not local.direct
    monkeypatch.setattr(local_storage.os, "open", real_open)

    direct_writes: list[int] = []

    def second_refused(fd: int, data: Any, offset: int) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.append(len(data))
            if len(direct_writes) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data, offset)

    monkeypatch.setattr(local_storage.os, "pwrite", second_refused)
    other = LocalStorage(tmp_path / "b")
    other.put("k", stream(3 * MiB + 1))
    assert direct_writes == [MiB, MiB] and not other.direct  # one piece direct, the rest through the cache
    assert digest(other.open("k")) == digest(stream(3 * MiB + 1)) and other.stat("k").size == 3 * MiB + 1
    other.put("k2", pattern(MiB))
    assert len(direct_writes) == 2 and read_all(other, "k2") == pattern(MiB)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_local_permission_denied(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    local = LocalStorage(root)
    local.put("p/a", b"1")
    (root / "p").chmod(0o500)
    try:
        with pytest.raises(AccessDenied):
            local.put("p/b", b"2")
    finally:
        (root / "p").chmod(0o700)


# --- S3 backend ------------------------------------------------------------------


def test_s3_large_stream_uses_multipart(s3: S3Storage, s3_server: S3Server, s3_bucket: str) -> None:
    s3.put("mp/big", stream(BIG))
    etag = s3_server.client().head_object(Bucket=s3_bucket, Key="repo/mp/big")["ETag"]
    assert etag.strip('"').endswith("-8"), etag  # 40 MiB in 5 MiB parts


def test_s3_keys_live_under_prefix(s3: S3Storage, s3_server: S3Server, s3_bucket: str) -> None:
    s3.put("k/v", b"1")
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["repo/k/v"]


def test_s3_missing_bucket(s3_server: S3Server) -> None:
    missing = S3Storage("svb-no-such-bucket", "", s3_options(s3_server))
    with pytest.raises(BucketNotFound):
        missing.put("a", b"1")
    with pytest.raises(BucketNotFound):
        missing.open("a")
    with pytest.raises(BucketNotFound):
        list(missing.list(""))
    with pytest.raises(BucketNotFound):
        missing.delete("a")
    # HEAD responses carry no body, so a missing bucket looks like a missing key.
    with pytest.raises(NotFound):
        missing.stat("a")


def test_s3_wrong_credentials_access_denied(s3_server: S3Server, s3_bucket: str) -> None:
    secret = "definitely-not-the-secret-0123456789"
    bad = S3Storage(s3_bucket, "", s3_options(s3_server, access_key_id="AKIANOTAKEY", secret_access_key=secret))
    with s3_server.enforce_auth():
        for call in (lambda: bad.put("a", b"1"), lambda: list(bad.list("")), lambda: bad.open("a")):
            with pytest.raises(AccessDenied) as info:
                call()
            text = str(info.value)
            assert secret not in text
            assert "\n" not in text


def test_s3_unreachable_endpoint_is_transient_and_quick() -> None:
    with socket.socket() as sock:  # nothing listens on a port we just released
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = S3Options(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
        path_style=True,
    )
    dead = S3Storage("bucket", "", options)
    started = time.monotonic()
    with pytest.raises(TransientStorageError) as info:
        dead.stat("a")
    with pytest.raises(TransientStorageError):
        dead.put("a", b"1")
    assert time.monotonic() - started < 20
    assert "\n" not in str(info.value)


def test_s3_options() -> None:
    assert S3Options(endpoint_url="http://localhost:9000").allow_http is True
    assert S3Options(endpoint_url="https://s3.example.com").allow_http is False
    assert S3Options().allow_http is False
    assert S3Options(endpoint_url="http://x", allow_http=False).allow_http is False
    shown = repr(S3Options(access_key_id="AKID", secret_access_key="s3cr3t", session_token="t0k3n"))
    assert "s3cr3t" not in shown and "t0k3n" not in shown
    with pytest.raises(ConfigError):
        S3Options(part_size=MiB)


# --- registry --------------------------------------------------------------------


def test_registry(tmp_path: Path) -> None:
    local = open_storage(f"file://{tmp_path}/r1")
    assert isinstance(local, LocalStorage) and local.root == str(tmp_path / "r1")
    plain = open_storage(str(tmp_path / "r2"))
    assert isinstance(plain, LocalStorage) and plain.root == str(tmp_path / "r2")
    assert open_storage("memory://shared") is open_storage("memory://shared")
    assert open_storage("memory://one") is not open_storage("memory://two")
    remote = open_storage("s3://my-bucket/some/prefix/", S3Options(endpoint_url="http://127.0.0.1:1"))
    assert isinstance(remote, S3Storage)
    assert (remote.bucket, remote.prefix) == ("my-bucket", "some/prefix")
    assert remote.capabilities.url == "s3://my-bucket/some/prefix"
    for url in ("gs://bucket/x", "az://container/x"):
        with pytest.raises(ConfigError, match="not supported yet"):
            open_storage(url)
    for url, root in ((f"file://localhost{tmp_path}/r3", f"{tmp_path}/r3"), (f"file://{tmp_path}/a%20b", f"{tmp_path}/a b"),
                      (f"FILE://{tmp_path}/r4", f"{tmp_path}/r4")):
        store = open_storage(url)
        assert isinstance(store, LocalStorage) and store.root == root, url
    for url in ("ftp://host/x", "file://otherhost/x", "file://otherhost/x%20y", "file://relative", "s3:///nobucket", ""):
        with pytest.raises(ConfigError):
            open_storage(url)


# --- wrappers --------------------------------------------------------------------


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_retrying_recovers_from_transient_failures() -> None:
    faulty = FaultyStorage(MemoryStorage())
    sleeps = Sleeps()
    retrying = RetryingStorage(faulty, attempts=5, base_delay=0.2, max_delay=5, sleep=sleeps)
    for op in ("put", "stat", "list", "delete", "open"):
        faulty.fail_next(op, 4)
    retrying.put("r/a", b"payload")
    assert retrying.stat("r/a").size == 7
    assert [i.key for i in retrying.list("r/")] == ["r/a"]
    assert read_all(retrying, "r/a") == b"payload"
    retrying.delete("r/a")
    assert faulty.calls == {"put": 5, "stat": 5, "list": 5, "open": 5, "delete": 5}
    assert len(sleeps) == 20
    assert all(0 < s <= 5 for s in sleeps)
    assert max(sleeps[:4]) < 0.2 * 2**3  # exponential from base_delay


def test_retrying_gives_up_after_attempts() -> None:
    faulty = FaultyStorage(MemoryStorage())
    retrying = RetryingStorage(faulty, attempts=3, sleep=Sleeps())
    faulty.fail_next("stat", 10)
    with pytest.raises(TransientStorageError):
        retrying.stat("x")
    assert faulty.calls["stat"] == 3


def test_retrying_does_not_retry_permanent_errors_or_streams() -> None:
    faulty = FaultyStorage(MemoryStorage())
    retrying = RetryingStorage(faulty, sleep=Sleeps())
    with pytest.raises(NotFound):
        retrying.stat("missing")
    assert faulty.calls["stat"] == 1
    faulty.fail_next("put", 1, lambda: PermanentStorageError("nope"))
    with pytest.raises(PermanentStorageError):
        retrying.put("k", b"1")
    faulty.fail_next("put", 1)
    with pytest.raises(TransientStorageError):
        retrying.put("k", iter([b"a stream is not replayable"]))
    assert faulty.calls["put"] == 2


def test_retrying_resumes_interrupted_reads() -> None:
    body = pattern(5 * MiB + 3)
    faulty = FaultyStorage(MemoryStorage())
    faulty.put("r/big", body)
    retrying = RetryingStorage(faulty, sleep=Sleeps())
    faulty.fail_reads_after(MiB + 5)
    faulty.fail_reads_after(100)
    assert read_all(retrying, "r/big") == body
    assert faulty.calls["open"] == 3
    faulty.fail_reads_after(10)
    assert b"".join(retrying.open("r/big", 1000, 2 * MiB)) == body[1000 : 1000 + 2 * MiB]


class LandsThenFails:
    """A backend whose first put is stored but reports a transient error."""

    def __init__(self) -> None:
        self.inner = MemoryStorage()
        self.capabilities = self.inner.capabilities
        self.failed = False

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        self.inner.put(key, data, if_absent=if_absent)
        if not self.failed:
            self.failed = True
            raise TransientStorageError("reply lost")

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        return self.inner.open(key, offset, length)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_retrying_if_absent_put_whose_reply_was_lost() -> None:
    backend = LandsThenFails()
    RetryingStorage(backend, sleep=Sleeps()).put("w", b"same", if_absent=True)
    assert read_all(backend, "w") == b"same"
    with pytest.raises(AlreadyExists):  # different content is still refused
        RetryingStorage(backend, sleep=Sleeps()).put("w", b"other", if_absent=True)


def test_faulty_corrupt_reads() -> None:
    faulty = FaultyStorage(MemoryStorage())
    faulty.put("data/a", b"abcdef")
    faulty.put("meta/b", b"abcdef")
    faulty.corrupt_reads(lambda key: key.startswith("data/"))
    corrupted = read_all(faulty, "data/a")
    assert corrupted != b"abcdef" and len(corrupted) == 6 and corrupted[1:] == b"bcdef"
    assert read_all(faulty, "meta/b") == b"abcdef"
    faulty.clear()
    faulty.corrupt_reads(lambda key: key == "meta/b", lambda chunk: chunk.upper())
    assert read_all(faulty, "meta/b") == b"ABCDEF"
    assert read_all(faulty.inner, "meta/b") == b"abcdef"  # stored bytes untouched


def test_limited_storage_bounds_concurrency() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    class Slow(MemoryStorage):
        def stat(self, key: str) -> ObjectInfo:
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.02)
            with lock:
                active -= 1
            return super().stat(key)

    inner = Slow()
    inner.put("k", b"1")
    limited = LimitedStorage(inner, 2)
    threads = [threading.Thread(target=limited.stat, args=("k",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2
    assert limited.capabilities is inner.capabilities


def test_limited_storage_releases_stream_permits() -> None:
    inner = MemoryStorage()
    inner.put("k", b"x" * (3 * MiB))
    limited = LimitedStorage(inner, 1)
    assert read_all(limited, "k") == b"x" * (3 * MiB)  # exhausted: released
    partial = limited.open("k")
    next(partial)
    partial.close()  # type: ignore[attr-defined]  # closed early: released
    unused = limited.open("k")
    del unused  # dropped without reading: released
    with pytest.raises(NotFound):
        limited.open("missing")  # failed open: released
    acquire: Callable[..., bool] = limited._sem.acquire
    assert acquire(timeout=1)
    limited._sem.release()
