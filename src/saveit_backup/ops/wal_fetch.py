"""Fetch one WAL file from the repository (``restore_command``), with prefetch.

Contract:

* the file is decoded (decryption authenticates it) and written to ``dest``
  atomically (temporary file in the same directory, then rename);
* a name that is not archived raises ``WalNotFound`` (exit 1: PostgreSQL ends
  recovery or switches to streaming); every other failure raises its own
  ``SaveitError`` (exit status != 1);
* for segments, the next ``prefetch`` segments of the same timeline are fetched
  in parallel into ``<dirname(dest)>/.saveit-prefetch/`` so the following calls
  are served by a local rename.  Cache files older than the requested name or
  than an hour are removed.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from saveit_backup.errors import NotFound, WalNotFound
from saveit_backup.ops.wal_cache import SEGSIZE_FILE, TMP_SUFFIX, cache_dir_for, clean_cache, take_cached
from saveit_backup.ops.wal_push import wal_name
from saveit_backup.repo import layout

if TYPE_CHECKING:
    from saveit_backup.repo.repository import Repository

log = logging.getLogger("saveit_backup.wal")

DEFAULT_PREFETCH = 8
DEFAULT_SEGSIZE = 16 << 20


@dataclass(frozen=True)
class FetchResult:
    name: str
    source: str  # "cache" | "repository"
    prefetched: int


def _write_atomic(chunks: Iterable[bytes], dest: str) -> int:
    """Write to a temporary file next to ``dest`` and rename it into place."""
    directory, base = os.path.split(os.path.abspath(dest))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    size = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size


def _fetch_to(repo: Repository, name: str, dest: str) -> bytes:
    """Decode ``name`` into ``dest``; return its first bytes (the page header). NotFound -> WalNotFound."""
    first = bytearray()

    def observed(chunks: Iterable[bytes]) -> Iterable[bytes]:
        for chunk in chunks:
            if len(first) < 64:
                first.extend(chunk[: 64 - len(first)])
            yield chunk

    try:
        _write_atomic(observed(repo.read_object(layout.wal_key(name))), dest)
    except NotFound:
        raise WalNotFound(f"{name} is not in the WAL archive at {repo.storage.capabilities.url}") from None
    return bytes(first)


def _next_names(name: str, count: int, segsize: int) -> list[str]:
    per = 0x1_0000_0000 // segsize
    tli, log_id, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
    segno = log_id * per + seg
    return [f"{tli:08X}{(n // per):08X}{(n % per):08X}" for n in range(segno + 1, segno + 1 + count)]


def _segsize(cache: str) -> int:
    try:
        with open(os.path.join(cache, SEGSIZE_FILE)) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_SEGSIZE
    return value if value >= 1 << 20 and value & (value - 1) == 0 else DEFAULT_SEGSIZE


def fetch(repo: Repository, name: str, dest: str, prefetch: int = DEFAULT_PREFETCH) -> FetchResult:
    """Write WAL file ``name`` to ``dest`` (see the module contract)."""
    kind = wal_name(name)
    if take_cached(name, dest):
        return FetchResult(name, "cache", 0)
    if kind != "segment" or prefetch <= 0:
        _fetch_to(repo, name, dest)
        return FetchResult(name, "repository", 0)

    cache = cache_dir_for(dest)
    os.makedirs(cache, mode=0o700, exist_ok=True)
    clean_cache(cache, name)
    segsize = _segsize(cache)
    wanted = [n for n in _next_names(name, prefetch, segsize) if not os.path.exists(os.path.join(cache, n))]

    def prefetch_one(n: str) -> bool:
        try:
            _fetch_to(repo, n, os.path.join(cache, n))
            return True
        except WalNotFound:
            return False
        except Exception as exc:  # a failed prefetch is retried as a normal fetch later
            log.debug("prefetch of %s failed: %s", n, exc)
            return False

    with ThreadPoolExecutor(max_workers=min(len(wanted), 16) or 1, thread_name_prefix="wal-prefetch") as pool:
        futures = [pool.submit(prefetch_one, n) for n in wanted]
        header = _fetch_to(repo, name, dest)  # main segment in this thread, in parallel with the prefetches
        done = sum(1 for f in futures if f.result())
    _remember_segsize(cache, header, segsize)
    return FetchResult(name, "repository", done)


def _remember_segsize(cache: str, header: bytes, known: int) -> None:
    from saveit_backup.domain.wal import parse_long_page_header

    try:
        size = parse_long_page_header(header).seg_size
    except ValueError:
        return
    if size != known:
        _write_atomic([str(size).encode()], os.path.join(cache, SEGSIZE_FILE))
