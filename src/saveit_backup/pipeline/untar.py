"""Extract a tar stream (a remote-mode backup: pg_basebackup's ustar) into a directory, big files with O_DIRECT.

Contract of ``extract(raw, target, what, direct)``:

* ``raw`` is a raw reader of the tar's bytes (``readinto``; a zstd reader decompresses straight into
  the buffers it is given).  ``target`` exists and is empty (``physical_restore.prepare_target``).
* Members are regular files, directories and symbolic links; pax (local and global) and GNU long
  names, link targets and sizes are read.  Anything else (hard links, devices, FIFOs), an absolute or
  ``..`` name, a member at or under a symbolic link of the same archive or whose directory resolves
  outside ``target``, a name used twice, a bad header checksum or pax record, an archive that ends
  before its end-of-archive blocks or holds anything but zeros after them is ``IntegrityError``, named
  by ``what``.  Nothing is written outside ``target``; ``raw`` is read to its end.
* Files of ``DIRECT_MIN`` bytes and more are written through ``direct`` (``direct_io.DirectFiles``:
  filled by ``raw`` in its aligned buffers, written by its helper thread, so decompressing and writing
  overlap, and the page cache is left alone); smaller ones are read into memory and written through
  the page cache by a helper thread (``small_files.SmallFiles``), so that creating them overlaps the
  decompression of what follows.  Files are created 0600 and directories 0700 (PostgreSQL's modes);
  mtimes are the archive's.  When ``extract`` returns or raises, every helper has finished.
* Returns (regular files, their bytes).
"""

from __future__ import annotations

import errno
import io
import os
import tarfile
from collections.abc import Callable

from saveit_backup.errors import IntegrityError
from saveit_backup.pipeline import small_files
from saveit_backup.pipeline.direct_io import BUFFER_SIZE, DirectFiles
from saveit_backup.pipeline.small_files import SmallFiles

BLOCK = 512
DIRECT_MIN = BUFFER_SIZE  # smaller files through the page cache: one padded direct write overlaps nothing
COPY_PIECE = 1 << 20
EXTENDED_MAX = 1 << 20  # pax and GNU long-name headers: a name, not data
_ZERO_BLOCK = bytes(BLOCK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class _Source:
    """Exact reads from ``raw``; a short read is an archive cut short."""

    def __init__(self, raw: io.RawIOBase, what: str) -> None:
        self.raw = raw
        self.what = what
        self.piece = memoryview(bytearray(COPY_PIECE))

    def truncated(self) -> IntegrityError:
        return IntegrityError(f"{self.what}: the archive is cut short (a member or its end-of-archive block is missing)")

    def fill(self, view: memoryview) -> int:
        """Fill ``view`` unless the stream ends first; returns the bytes read."""
        got = 0
        while got < len(view):
            n = self.raw.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    def exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        if self.fill(memoryview(buf)) != n:
            raise self.truncated()
        return buf

    def skip(self, n: int) -> None:
        while n:
            step = min(n, COPY_PIECE)
            if self.fill(self.piece[:step]) != step:
                raise self.truncated()
            n -= step

    def limited(self, size: int) -> Callable[[memoryview], int]:
        """A ``readinto`` of the next ``size`` bytes (0 after them; a stream ending earlier is cut short)."""
        left = size

        def readinto(view: memoryview) -> int:
            nonlocal left
            if not left:
                return 0
            n = self.raw.readinto(view[: min(len(view), left)])
            if not n:
                raise self.truncated()
            left -= n
            return n

        return readinto


def _pax_records(data: bytes | bytearray, what: str) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records (POSIX pax extended header), each checked as tarfile does."""
    out: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(data) and data[pos] != 0:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            end = pos + length
            if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n" or b"=" not in data[space:end]:
                raise ValueError(length)
            key, _, value = data[space + 1 : end - 1].partition(b"=")
            out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            pos = end
        if "size" in out and not (out["size"].isdigit() and out["size"].isascii()):
            raise ValueError(out["size"])
    except ValueError:
        raise IntegrityError(f"{what}: malformed pax header in the archive") from None
    return out


def _member_path(name: str, what: str) -> str:
    """The member's path relative to the target ("" for the archive's root); unsafe names refused."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    parts = name.split("/") if name not in ("", ".") else []
    if name.startswith("/") or ".." in parts:
        raise IntegrityError(f"{what}: unsafe path {name!r} in the archive")
    return "/".join(p for p in parts if p not in ("", "."))


def _clash(exc: BaseException) -> bool:
    """A NUL in a name, a name used twice (as file, directory or link: the disk may fold case), a link in the way."""
    return isinstance(exc, (ValueError, FileExistsError, NotADirectoryError, IsADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno == errno.ELOOP)


def extract(raw: io.RawIOBase, target: str, what: str, direct: DirectFiles) -> tuple[int, int]:
    def clash(name: str, exc: BaseException) -> BaseException:
        if _clash(exc):
            return IntegrityError(f"{what}: cannot extract {name!r} from the archive: {exc}")
        return exc

    small = SmallFiles(exclusive=True, translate=clash)
    try:
        result = _extract(_Source(raw, what), os.path.realpath(target), what, direct, small)
    finally:
        small.close()
    small.check()
    return result


def _extract(src: _Source, root: str, what: str, direct: DirectFiles, small: SmallFiles) -> tuple[int, int]:
    made = _Made(root)
    files = total = 0
    global_pax: dict[str, str] = {}
    pending: dict[str, str] = {}  # from pax / GNU long-name headers, for the next member
    block = bytearray(BLOCK)
    while True:
        if src.fill(memoryview(block)) != BLOCK:
            raise src.truncated()
        if block == _ZERO_BLOCK:  # end of archive: a second zero block, then only zeros (the record's padding)
            _check_end(src)
            return files, total
        try:
            info = tarfile.TarInfo.frombuf(bytes(block), tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as exc:
            raise IntegrityError(f"{what}: damaged tar header in the archive ({exc})") from None
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if info.size > EXTENDED_MAX:
                raise IntegrityError(f"{what}: an extended tar header of {info.size} bytes (at most {EXTENDED_MAX})")
            data = src.exact(info.size)
            src.skip(-info.size % BLOCK)
            if info.type == tarfile.XHDTYPE:
                pending.update(_pax_records(data, what))
            elif info.type == tarfile.XGLTYPE:
                global_pax.update(_pax_records(data, what))
            else:
                pending["path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"] = (
                    data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
            continue
        values = {**global_pax, **pending}
        pending.clear()
        name = _member_path(values.get("path", info.name), what)
        size = int(values["size"]) if "size" in values else info.size
        try:
            if _extract_member(src, root, name, info, values.get("linkpath", info.linkname), size, made, direct, small, what):
                files += 1
                total += size
        except (ValueError, OSError) as exc:
            if not _clash(exc):
                raise
            raise IntegrityError(f"{what}: cannot extract {name!r} from the archive: {exc}") from None


class _Made:
    """What this archive made: symbolic links (nothing is written at or under them), regular files (maybe
    not on disk yet: small files are written by helpers) and directories (checked to resolve inside the
    target, so later members need no look-up there: one would wait for a helper creating a file)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.links: set[str] = set()
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def directory(self, name: str, what: str) -> None:
        """Create the directory ``name`` and its parents, unless made already."""
        if name in self.dirs:
            return
        dest = os.path.join(self.root, name) if name else self.root
        if os.path.realpath(dest) != dest:  # through a link the archive did not make (case-folding directories...)
            raise IntegrityError(f"{what}: {name!r} in the archive resolves outside the target directory")
        os.makedirs(dest, 0o700, exist_ok=True)
        parts = name.split("/") if name else []
        self.dirs.update("/".join(parts[:i]) for i in range(len(parts) + 1))


def _extract_member(src: _Source, root: str, name: str, info: tarfile.TarInfo, linkname: str, size: int, made: _Made,
                    direct: DirectFiles, small: SmallFiles, what: str) -> bool:
    """One member (see the module contract); True for a regular file.  Like tarfile, only regular files
    have data in the archive."""
    parts = name.split("/") if name else []
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if any(p in made.links for p in prefixes):
        raise IntegrityError(f"{what}: {name!r} in the archive is at or under one of its symbolic links")
    if any(p in made.files for p in prefixes):
        raise IntegrityError(f"{what}: {name!r} appears twice in the archive, or is under a file of it")
    if info.type == tarfile.DIRTYPE:
        made.directory(name, what)
        return False
    if not name:
        raise IntegrityError(f"{what}: an archive member has no name")
    if info.type not in (tarfile.SYMTYPE, *_FILE_TYPES):
        raise IntegrityError(f"{what}: {name!r} in the archive is a {_KINDS.get(info.type, 'special file')}, "
                             "which a data directory never holds", hint="extract the archive by hand to inspect it")
    if name in made.dirs:
        raise IntegrityError(f"{what}: {name!r} appears twice in the archive")
    made.directory("/".join(parts[:-1]), what)
    dest = os.path.join(root, name)
    if info.type == tarfile.SYMTYPE:
        os.symlink(linkname, dest)  # FileExistsError where anything is
        made.links.add(name)
        return False
    made.files.add(name)
    if size < DIRECT_MIN:
        small.submit(dest, src.exact(size), mtime=info.mtime, label=name)
    else:
        _write_big(src, dest, size, info.mtime, direct)
    src.skip(-size % BLOCK)
    return True


def _check_end(src: _Source) -> None:
    """After the first zero block: a second one, then nothing but zeros to the end of the stream."""
    if src.fill(src.piece[:BLOCK]) != BLOCK:
        raise src.truncated()
    n = BLOCK
    while n:
        if bytes(src.piece[:n]).strip(b"\0"):
            raise IntegrityError(f"{src.what}: the archive holds data after its end-of-archive blocks")
        n = src.fill(src.piece)


_KINDS = {tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
          tarfile.FIFOTYPE: "FIFO"}


def _write_big(src: _Source, dest: str, size: int, mtime: float, direct: DirectFiles) -> None:
    """``size`` bytes of ``src`` into the new file ``dest``: direct writes, else streamed through the cache."""
    fd = direct.open(dest, exclusive=True)
    if fd is not None:
        try:
            direct.write(fd, src.limited(size), _ignore)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        return
    fd = small_files.create(dest, exclusive=False)  # where O_DIRECT is refused, the kernel created the file before refusing the flag
    try:
        readinto = src.limited(size)
        while n := readinto(src.piece):
            small_files.write_all(fd, src.piece[:n])
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def _ignore(view: memoryview) -> None:
    """No per-file digest: the caller checks the archive object's digest (``physical_restore.extract_archive``)."""
