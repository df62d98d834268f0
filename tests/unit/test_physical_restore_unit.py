"""Physical restore: the order objects go to the threads, and a file written from its own object."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import blake3
import pytest

from saveit_backup.errors import IntegrityError, NotFound
from saveit_backup.ops import physical_restore
from saveit_backup.ops.physical_restore import FILE_COST_BYTES, _costliest_first, _Schedule
from saveit_backup.pipeline import direct_io
from saveit_backup.pipeline.envelope import EncodeOptions
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository
from saveit_backup.storage.memory import MemoryStorage

MiB = 1 << 20


def _obj(name: str, *sizes: int) -> tuple[tuple[str, str], list[dict[str, Any]]]:
    return ("B1", name), [{"path": f"{name}/{i}", "size": s, "offset": 0} for i, s in enumerate(sizes)]


@pytest.mark.parametrize("objects, expected", [
    # the biggest file first, then by bytes
    ([_obj("f2", 269 * MiB), _obj("f1", 1024 * MiB), _obj("f3", 45 * MiB)], ["f1", "f2", "f3"]),
    # 650 small files cost more than a 137 MiB file, less than a 269 MiB one
    ([_obj("f4", 137 * MiB), _obj("p1", *[20_000] * 650), _obj("f2", 269 * MiB)], ["f2", "p1", "f4"]),
    # equal cost: by name
    ([_obj("f9", MiB), _obj("f8", MiB)], ["f8", "f9"]),
    # an empty file still costs its creation
    ([_obj("f1", 0), _obj("f2", FILE_COST_BYTES // 2)], ["f2", "f1"]),
])
def test_costliest_objects_start_first(objects: list[Any], expected: list[str]) -> None:
    assert [name for (_, name), _ in sorted(objects, key=_costliest_first)] == expected


def _sched_names(schedule: _Schedule) -> list[str]:
    out = []
    while (item := schedule.next()) is not None:
        out.append(item[0][1])
    return out


def test_packs_go_first_while_the_small_file_helper_has_room() -> None:
    objects = [_obj("f1", 1024 * MiB), _obj("p1", *[20_000] * 650), _obj("f2", 269 * MiB), _obj("p2", *[10_000] * 300)]
    assert _sched_names(_Schedule(objects, lambda n: True)) == ["p1", "p2", "f1", "f2"]
    # no room: the files of their own first, the packs when nothing else is left (their submit waits then)
    assert _sched_names(_Schedule(objects, lambda n: False)) == ["f1", "f2", "p1", "p2"]
    # room for the smaller pack only: it is not taken out of order, the costliest pack waits for room
    assert _sched_names(_Schedule(objects, lambda n: n <= 3_000_000)) == ["f1", "f2", "p1", "p2"]
    # no helper (delta restores): costliest first, as test_costliest_objects_start_first
    assert _sched_names(_Schedule(objects, None)) == ["f1", "f2", "p1", "p2"]
    schedule = _Schedule(objects, lambda n: True)
    assert schedule.next() is not None
    schedule.stop()  # a thread failed: the others take nothing more
    assert schedule.next() is None


def _pack_writer(tmp_path: Path, files: list[tuple[str, bytes]], damaged: str = "") -> tuple[Any, list[dict[str, Any]]]:
    repo = Repository(MemoryStorage())
    repo.init()
    repo.put_object(layout.object_key("B1", "p000001"), [b"".join(data for _, data in files)], EncodeOptions())
    entries, offset = [], 0
    for n, (path, data) in enumerate(files):
        recorded = data + b"!" if path == damaged else data
        entries.append({"path": path, "size": len(data), "offset": offset, "mode": 0o600 if n % 2 else 0o640,
                        "mtime": 1_700_000_000 + n, "digest": "blake3:" + blake3.blake3(recorded).hexdigest()})
        offset += len(data)
    (tmp_path / "base/1").mkdir(parents=True)
    return physical_restore.Writer(repo, SimpleNamespace(id="B1", physical={}), tmp_path, {}, False), entries  # type: ignore[arg-type]


def test_a_pack_is_written_by_the_small_file_helper_and_checked_first(tmp_path: Path) -> None:
    files = [(f"base/1/{n}", random.Random(n).randbytes(n * 100)) for n in range(6)]
    writer, entries = _pack_writer(tmp_path / "ok", files)
    try:
        assert writer.restore_object("p000001", entries, "B1") == sum(len(d) for _, d in files)
    finally:
        writer.small.close()
    writer.small.check()
    for e, (path, data) in zip(entries, files, strict=True):
        st = (tmp_path / "ok" / path).stat()
        assert (tmp_path / "ok" / path).read_bytes() == data
        assert (st.st_mode & 0o777, st.st_mtime) == (e["mode"], e["mtime"])
    writer, entries = _pack_writer(tmp_path / "bad", files, damaged="base/1/3")
    with pytest.raises(IntegrityError, match="base/1/3 differs from the manifest"):
        writer.restore_object("p000001", entries, "B1")
    writer.small.close()
    assert sorted(os.listdir(tmp_path / "bad/base/1")) == ["0", "1", "2"]  # checked before it is handed over


# --- Writer.restore_object: a file stored alone, written directly or through the page cache ---------------------
SMALL = 64 << 10
DATA = random.Random(3).randbytes(3 * SMALL + 100) + bytes(SMALL)  # odd tail; a compressible end


@pytest.fixture()
def small_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_io, "BUFFER_SIZE", SMALL)
    monkeypatch.setattr(physical_restore, "DIRECT_MIN", SMALL)


def _restore(target: Path, stored: bytes | None = DATA, codec: str = "zstd", recorded: bytes = DATA,
             refuse_direct: bool = False, cut: int = 0) -> list[int]:
    """Restore one file from its object (its last ``cut`` stored bytes lost); returns the sizes ``DirectFiles.write`` wrote."""
    repo = Repository(MemoryStorage())
    repo.init()
    key = layout.object_key("B1", "f000001")
    if stored is not None:
        repo.put_object(key, [stored[i : i + 50_000] for i in range(0, len(stored), 50_000)], EncodeOptions(codec=codec))
    if cut:
        whole = b"".join(repo.storage.open(key))
        repo.storage.delete(key)
        repo.storage.put(key, whole[:-cut])
    writer = physical_restore.Writer(repo, SimpleNamespace(id="B1", physical={}), target, {}, False)  # type: ignore[arg-type]
    if refuse_direct:
        writer.direct.supported = False
    written: list[int] = []
    real_write = writer.direct.write
    writer.direct.write = lambda fd, readinto, update: written.append(real_write(fd, readinto, update)) or written[-1]  # type: ignore[method-assign]
    entry = {"path": "base/1/16384", "size": len(recorded), "offset": 0, "mode": 0o640, "mtime": 1_700_000_000,
             "digest": "blake3:" + blake3.blake3(recorded).hexdigest()}
    (target / "base/1").mkdir(parents=True, exist_ok=True)
    try:
        assert writer.restore_object("f000001", [entry], "B1") == len(recorded)
    finally:
        writer.direct.close()
    return written


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("refuse_direct", [False, True])
def test_a_file_alone_in_its_object_is_restored_exactly(tmp_path: Path, small_direct: None, codec: str, refuse_direct: bool) -> None:
    written = _restore(tmp_path, codec=codec, refuse_direct=refuse_direct)
    restored = tmp_path / "base/1/16384"
    assert restored.read_bytes() == DATA
    assert restored.stat().st_mode & 0o777 == 0o640 and restored.stat().st_mtime == 1_700_000_000
    assert written == ([] if refuse_direct else [len(DATA)])  # O_DIRECT where the file system allows it (ext4 here)


def test_a_damaged_or_missing_object_is_refused(tmp_path: Path, small_direct: None) -> None:
    with pytest.raises(IntegrityError, match="differs from the manifest"):  # a different file than the manifest's
        _restore(tmp_path, recorded=DATA[:-1] + b"x")
    with pytest.raises(IntegrityError, match="differs from the manifest"):  # one byte short
        _restore(tmp_path, stored=DATA[:-1])
    with pytest.raises(IntegrityError, match="differs from the manifest"):  # the stored stream cut: the reader ends early
        _restore(tmp_path, cut=30)
    with pytest.raises(NotFound):
        _restore(tmp_path / "other", stored=None)
    assert not (tmp_path / "other/base/1/16384").exists()  # the object is opened before the file is created


# --- extract_archive: a remote-mode backup's tar, checked against the manifest's object entry ----------------------
def _archive_repo(content: str) -> tuple[Repository, Any, bytes]:
    """A repository holding one remote-mode archive (``tar`` or ``tar.zst``) and a manifest stand-in for it."""
    import io
    import tarfile

    import zstandard

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("PG_VERSION", b"15\n"), ("base/1/16384", DATA)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = out.getvalue() if content == "tar" else zstandard.ZstdCompressor(level=3).compress(out.getvalue())
    repo = Repository(MemoryStorage())
    repo.init()
    name = f"base.{content}"
    digest = repo.put_object(layout.object_key("B1", name), [body], EncodeOptions(codec="none"))
    entry = SimpleNamespace(name=name, size=digest.plain_size, digest=digest.plain_digest)
    manifest = SimpleNamespace(id="B1", physical={"archive": {"object": name, "content": content}}, objects=[entry])
    return repo, manifest, body


@pytest.mark.parametrize("content", ["tar", "tar.zst"])
def test_remote_archive_extracted_and_checked_against_the_manifest(tmp_path: Path, small_direct: None, content: str) -> None:
    repo, manifest, body = _archive_repo(content)
    physical_restore.extract_archive(repo, manifest, tmp_path / "ok")
    assert (tmp_path / "ok/base/1/16384").read_bytes() == DATA and (tmp_path / "ok/PG_VERSION").read_bytes() == b"15\n"
    manifest.objects[0].digest = "blake3:" + blake3.blake3(body + b"x").hexdigest()  # the manifest records other bytes
    with pytest.raises(IntegrityError, match="differs from the manifest"):
        physical_restore.extract_archive(repo, manifest, tmp_path / "other")
    manifest.objects = []
    with pytest.raises(IntegrityError, match="lists no object"):
        physical_restore.extract_archive(repo, manifest, tmp_path / "none")
