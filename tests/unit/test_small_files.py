"""pipeline/small_files: files written by one helper thread, in order, within a byte budget, failures raised."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from saveit_backup.errors import IntegrityError
from saveit_backup.pipeline import small_files
from saveit_backup.pipeline.small_files import SmallFiles


def test_files_written_with_mode_and_times(tmp_path: Path) -> None:
    small = SmallFiles()
    try:
        small.submit(str(tmp_path / "a"), b"abc", mode=0o640, mtime=1_700_000_000)
        small.submit(str(tmp_path / "b"), memoryview(b"xyz123")[3:])
        small.submit(str(tmp_path / "empty"), b"")
    finally:
        small.close()
    small.check()
    assert (tmp_path / "a").read_bytes() == b"abc" and stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640
    assert (tmp_path / "a").stat().st_mtime == 1_700_000_000
    assert (tmp_path / "b").read_bytes() == b"123" and stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600
    assert (tmp_path / "empty").read_bytes() == b""


def test_never_through_a_symbolic_link_and_exclusive_refuses_what_exists(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(victim)
    for exclusive, name in ((False, "link"), (True, "victim")):
        small = SmallFiles(exclusive=exclusive, translate=lambda label, exc: IntegrityError(f"{label}: {exc}"))
        small.submit(str(tmp_path / name), b"overwritten", label=name)
        small.close()
        with pytest.raises(IntegrityError, match=name):
            small.check()
    assert victim.read_bytes() == b"keep"


def test_submit_waits_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The submitting thread runs ahead of the helper by at most the budget (or one file)."""
    real = small_files.write_file
    peaks: dict[str, int] = {}
    small = SmallFiles(budget=3000)

    def slow(path: str, data: small_files.Data, mode: int, mtime: float | None, exclusive: bool) -> None:
        with small.cond:
            name = "huge" if path.endswith("huge") else "small"
            peaks[name] = max(peaks.get(name, 0), small.waiting)
        time.sleep(0.01)
        real(path, data, mode, mtime, exclusive)

    monkeypatch.setattr(small_files, "write_file", slow)
    contents = [os.urandom(1000) for _ in range(12)]
    try:
        for n, c in enumerate(contents):
            small.submit(str(tmp_path / f"f{n}"), c)
        small.submit(str(tmp_path / "huge"), bytes(10_000))  # bigger than the budget: accepted once the queue is empty
    finally:
        small.close()
    small.check()
    assert 2000 <= peaks["small"] <= 3000
    assert peaks["huge"] == 10_000
    assert [(tmp_path / f"f{n}").read_bytes() for n in range(12)] == contents
    assert small.waiting == 0 and small.room_for(3000) and small.room_for(10**9)


def test_a_failure_stops_the_writing_and_reaches_the_submitter(tmp_path: Path) -> None:
    small = SmallFiles()
    small.submit(str(tmp_path / "missing-dir" / "a"), b"x")
    small.close()
    with pytest.raises(FileNotFoundError):
        small.check()
    assert not [t for t in threading.enumerate() if t.name.startswith("small-files")]
    small = SmallFiles()
    small.submit(str(tmp_path / "missing-dir" / "a"), b"x")
    deadline = time.monotonic() + 10
    while small.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(FileNotFoundError):
        small.submit(str(tmp_path / "b"), b"y")
    small.close()
    assert not (tmp_path / "b").exists()
