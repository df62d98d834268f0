"""pipeline/untar: a remote-mode backup's tar extracted, big files through O_DIRECT, hostile archives refused."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from saveit_backup.errors import IntegrityError
from saveit_backup.pipeline import direct_io, small_files, untar
from saveit_backup.pipeline.direct_io import DirectFiles

BUF = 64 << 10


@pytest.fixture(autouse=True)
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct writes from BUF bytes on: the direct path runs with small test files."""
    monkeypatch.setattr(direct_io, "BUFFER_SIZE", BUF)
    monkeypatch.setattr(untar, "DIRECT_MIN", BUF)


def _tar(members: list[tuple[str, str, bytes | str]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """(kind, name, content or link target) -> the archive's bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for kind, name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                assert isinstance(content, bytes)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type = {"dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                             "fifo": tarfile.FIFOTYPE}[kind]
                if isinstance(content, str):
                    info.linkname = content
                tar.addfile(info)
    return out.getvalue()


def _extract(data: bytes, target: Path) -> tuple[int, int]:
    target.mkdir(exist_ok=True)
    files = DirectFiles()
    try:
        return untar.extract(io.BytesIO(data), str(target), "backup X", files)
    finally:
        files.close()


def _pattern(size: int, seed: int) -> bytes:
    return (bytes([seed]) * 7 + os.urandom(1)) * (size // 8) + bytes(size % 8)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_files_directories_and_links_as_archived(tmp_path: Path, fmt: int) -> None:
    big = _pattern(3 * BUF + 1234, 1)  # direct path: several buffers and a padded last block
    exact = _pattern(2 * BUF, 2)  # direct path, a whole number of buffers
    long_dir = "base/" + "d" * 120 if fmt != tarfile.USTAR_FORMAT else "base/16384"
    members: list[tuple[str, str, bytes | str]] = [
        ("dir", "./", b""), ("file", "./backup_label", b"START WAL LOCATION: 0/2000028\n"), ("dir", "base", b""),
        ("dir", long_dir, b""), (("file", f"{long_dir}/16397", big)), ("file", f"{long_dir}/16397.1", exact),
        ("file", "global/pg_control", _pattern(8192, 3)), ("file", "empty", b""),
        ("link", "pg_tblspc/16500", "/srv/tablespaces/one"),
    ]
    data = _tar(members, fmt)
    target = tmp_path / "t"
    assert _extract(data, target) == (5, len(big) + len(exact) + 8192 + 30)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            dest = target / m.name
            if m.isfile():
                extracted = tar.extractfile(m)
                assert extracted is not None
                assert dest.read_bytes() == extracted.read(), m.name
                assert dest.stat().st_mtime == 1_700_000_000 and dest.stat().st_mode & 0o777 == 0o600
    assert os.readlink(target / "pg_tblspc" / "16500") == "/srv/tablespaces/one"
    assert (target / long_dir).is_dir()


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "base/../../escape", "./../escape"])
def test_unsafe_names_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(IntegrityError, match="unsafe path"):
        _extract(_tar([("file", name, b"x")]), tmp_path / "t")
    assert not (tmp_path / "escape").exists()


def test_nothing_written_through_the_archives_own_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for members in ([("link", "pg_wal", str(outside)), ("file", "pg_wal/000000010000000000000001", b"x")],
                    [("link", "PG_VERSION", str(outside / "victim")), ("file", "PG_VERSION", b"15\n")]):
        with pytest.raises(IntegrityError, match="symbolic links"):
            _extract(_tar(members), tmp_path / f"t{len(os.listdir(tmp_path))}")
    assert os.listdir(outside) == []


@pytest.mark.parametrize(("kind", "what"), [("hard", "hard link"), ("fifo", "FIFO")])
def test_special_members_refused(tmp_path: Path, kind: str, what: str) -> None:
    with pytest.raises(IntegrityError, match=what):
        _extract(_tar([("file", "a", b"x"), (kind, "b", "a")]), tmp_path / "t")


@pytest.mark.parametrize("members", [
    [("file", "a", b"x"), ("file", "a", b"y")],
    [("file", "a", b"x"), ("dir", "a", b"")],
    [("dir", "a", b""), ("file", "a", b"x")],
    [("file", "a/b", b"x"), ("link", "a", "elsewhere")],
    [("file", "a", b"x"), ("file", "a/b", b"y")],  # a file of the archive in the path of another member
    [("file", "a", b"x"), ("link", "a", "elsewhere")],
])
def test_name_clashes_refused(tmp_path: Path, members: list[tuple[str, str, bytes | str]]) -> None:
    """Small files are written by a helper thread, maybe after the next member is read: clashes are
    found from the names the archive made, not from the disk."""
    with pytest.raises(IntegrityError, match=r"appears twice|under a file"):
        _extract(_tar(members), tmp_path / "t")


@pytest.mark.parametrize("size", [10, 2 * BUF])
def test_never_written_through_a_link_already_there(tmp_path: Path, size: int) -> None:
    """A link the archive did not make (on a case-folding disk, ``A`` for a member ``a``): small files and
    direct writes alike create their file exclusively, never through it."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "t"
    target.mkdir()
    (target / "a").symlink_to(victim)
    with pytest.raises(IntegrityError, match="cannot extract 'a'"):
        _extract(_tar([("file", "a", _pattern(size, 1))]), target)
    assert victim.read_bytes() == b"keep"


def test_a_helpers_failure_is_raised_after_every_helper_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = small_files.write_file

    def failing(path: str, data: small_files.Data, mode: int, mtime: float | None, exclusive: bool) -> None:
        if path.endswith("/f3"):
            raise OSError(28, "No space left on device")
        real(path, data, mode, mtime, exclusive)
        written.append(os.path.basename(path))

    monkeypatch.setattr(small_files, "write_file", failing)
    members: list[tuple[str, str, bytes | str]] = [("file", f"f{n}", b"x" * n) for n in range(8)]
    with pytest.raises(OSError, match="No space left"):
        _extract(_tar(members), tmp_path / "t")
    assert written == ["f0", "f1", "f2"]  # in order; nothing after the failure
    assert not [t for t in threading.enumerate() if t.name.startswith("small-files")]  # nothing still being written


def test_cut_archive_and_damaged_header(tmp_path: Path) -> None:
    big = _pattern(2 * BUF + 100, 4)
    data = _tar([("file", "small", b"abc"), ("file", "big", big)])
    second = 1024  # "small": header and one data block; then the header of "big"
    members_end = second + 512 + len(big) + (-len(big) % 512)
    assert data[second : second + 3] == b"big" and data[members_end : members_end + 1024] == bytes(1024)
    # before a header, inside one, inside the data (direct writes), after the last member without its end block
    for n, cut in enumerate([second, second + 100, second + 600, second + 512 + BUF, members_end]):
        with pytest.raises(IntegrityError, match="cut short"):
            _extract(data[:cut], tmp_path / f"c{n}")
    with pytest.raises(IntegrityError, match="cut short"):  # one end-of-archive block of two
        _extract(data[: members_end + 512], tmp_path / "one-end-block")
    assert _extract(data[: members_end + 1024], tmp_path / "whole") == (2, 3 + len(big))
    damaged = bytearray(data)
    damaged[second + 124] ^= 0x01  # the size field: the header checksum no longer matches
    with pytest.raises(IntegrityError, match="damaged tar header"):
        _extract(bytes(damaged), tmp_path / "d")


def test_direct_writes_used_for_big_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The big file goes through DirectFiles (where the file system allows O_DIRECT), the small one does not."""
    opened: list[str] = []
    real_open = DirectFiles.open

    def spy(self: DirectFiles, path: str, exclusive: bool = False) -> int | None:
        opened.append(os.path.basename(path))
        assert exclusive  # a new file, never through a link
        return real_open(self, path, exclusive)

    monkeypatch.setattr(DirectFiles, "open", spy)
    big = _pattern(BUF + 1, 5)
    _extract(_tar([("file", "small", b"abc"), ("file", "big", big)]), tmp_path / "t")
    assert opened == ["big"] and (tmp_path / "t" / "big").read_bytes() == big


def test_data_after_the_end_or_a_zeroed_header_refused(tmp_path: Path) -> None:
    """A header zeroed in the middle reads as the end of the archive: what follows must be zeros."""
    data = _tar([("file", "a", b"x" * 600), ("file", "b", b"y" * 10)])
    second = 512 + 1024  # "a": header and two data blocks
    zeroed = data[:second] + bytes(512) + data[second + 512 :]
    with pytest.raises(IntegrityError, match="data after its end"):
        _extract(zeroed, tmp_path / "z")
    with pytest.raises(IntegrityError, match="data after its end"):
        _extract(data + b"trailing", tmp_path / "t")
    assert _extract(data + bytes(20_000), tmp_path / "padded") == (2, 610)


def test_o_direct_refused_after_the_file_was_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux creates the file before refusing O_DIRECT (EINVAL): the page-cache path writes it all the same."""

    def refused(self: DirectFiles, path: str, exclusive: bool = False) -> int | None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        self.supported = False
        return None

    monkeypatch.setattr(DirectFiles, "open", refused)
    big = _pattern(3 * BUF + 5, 6)
    assert _extract(_tar([("file", "big", big), ("file", "small", b"abc")]), tmp_path / "t") == (2, len(big) + 3)
    assert (tmp_path / "t" / "big").read_bytes() == big


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_link_targets(tmp_path: Path, fmt: int) -> None:
    far = "/srv/" + "t" * 150 + "/tablespace"
    _extract(_tar([("link", "pg_tblspc/16500", far)], fmt), tmp_path / "t")
    assert os.readlink(tmp_path / "t" / "pg_tblspc" / "16500") == far


def _pax(records: bytes, then: bytes = b"") -> bytes:
    """A pax extended header holding ``records``, followed by the member archive ``then``."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512) + then


@pytest.mark.parametrize("records", [b"0 \n", b"99 path=foo\n", b"12 path=foo!", b"5 path=\n", b"x path=a\n", b"12 size=1x2\n",
                                     b"14 path=a\0b/c\n"])
def test_malformed_pax_headers_refused(tmp_path: Path, records: bytes) -> None:
    with pytest.raises(IntegrityError):
        _extract(_pax(records, _tar([("file", "a", b"x")])), tmp_path / "t")


def test_pax_overrides_the_next_member_only(tmp_path: Path) -> None:
    first = _tar([("file", "short", b"abc")])[:1024]  # header and data, no end blocks
    archive = _pax(b"18 path=long/name\n", first) + _tar([("file", "plain", b"xyz")])
    assert _extract(archive, tmp_path / "t") == (2, 6)
    assert (tmp_path / "t" / "long" / "name").read_bytes() == b"abc" and (tmp_path / "t" / "plain").read_bytes() == b"xyz"


def test_clashing_members_refused(tmp_path: Path) -> None:
    for n, members in enumerate([[("link", "pg_wal", "/elsewhere"), ("dir", "pg_wal", b"")],  # a directory over a link
                                 [("file", "PG_VERSION", b"15\n"), ("file", "PG_VERSION/x", b"y")],  # under a file
                                 [("file", "global", b"x"), ("dir", "global", b"")]]):
        with pytest.raises(IntegrityError):
            _extract(_tar(members), tmp_path / f"t{n}")


def test_pax_size_overrides_the_header_size(tmp_path: Path) -> None:
    """Files over 8 GiB carry their size in a pax record: the data length is the record's, not the header field's."""
    info = tarfile.TarInfo("big")
    info.size = 0  # what a writer puts in the ustar field when the size does not fit
    member = info.tobuf(tarfile.USTAR_FORMAT) + b"abc" + bytes(509)
    archive = _pax(b"10 size=3\n", member) + bytes(1024)
    assert _extract(archive, tmp_path / "t") == (1, 3)
    assert (tmp_path / "t" / "big").read_bytes() == b"abc"
