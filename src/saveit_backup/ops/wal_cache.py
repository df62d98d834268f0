"""wal-fetch's prefetch cache: ``<dirname(dest)>/.saveit-prefetch/`` (contract in ``ops.wal_fetch``).

Serving a cached file is what most ``restore_command`` calls do during recovery, so this module
imports nothing beyond ``os`` and ``time``: ``entry`` answers a cache hit before the configuration
and the CLI load.
"""

from __future__ import annotations

import os
import time

PREFETCH_DIR = ".saveit-prefetch"  # next to the destination in pg_wal
STALE_SECONDS = 3600.0  # during recovery
PREFETCH_STALE_SECONDS = 600.0  # once archiving runs again: recovery has ended
TMP_SUFFIX = ".tmp-saveit"
SEGSIZE_FILE = "segsize"  # remembered segment size (names of the next segments depend on it)


def cache_dir_for(dest: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(dest)), PREFETCH_DIR)


def take_cached(name: str, dest: str) -> bool:
    """Serve ``name`` from the prefetch cache by renaming it to ``dest``; no configuration needed."""
    if not name or os.sep in name or name.startswith("."):
        return False
    cache = cache_dir_for(dest)
    try:
        os.replace(os.path.join(cache, name), dest)
    except FileNotFoundError:
        return False
    except OSError as exc:
        import logging

        logging.getLogger("saveit_backup.wal").warning("prefetched %s could not be moved to %s: %s", name, dest, exc)
        return False
    clean_cache(cache, name)
    return True


def clean_cache(cache: str, requested: str) -> None:
    """Drop cache files recovery will not ask for: older names, old files, leftover temporaries."""
    now = time.time()
    try:
        entries = list(os.scandir(cache))
    except OSError:
        return
    for entry in entries:
        if entry.name == SEGSIZE_FILE:
            continue
        try:
            age = now - entry.stat().st_mtime
            older = len(entry.name) == 24 and len(requested) == 24 and entry.name < requested
            if older or age > STALE_SECONDS or (entry.name.endswith(TMP_SUFFIX) and age > 60):
                os.unlink(entry.path)
        except OSError:
            pass


def clean_prefetch(pg_wal: str, max_age: float = PREFETCH_STALE_SECONDS) -> None:
    """Remove old prefetch files left in pg_wal after recovery ended (best effort; wal-push calls it)."""
    cache = os.path.join(pg_wal, PREFETCH_DIR)
    try:
        entries = list(os.scandir(cache))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat().st_mtime > max_age:
                os.unlink(entry.path)
        except OSError:
            pass
    try:
        os.rmdir(cache)
    except OSError:
        pass
