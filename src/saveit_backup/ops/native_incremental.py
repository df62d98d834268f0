"""Remote-mode diff/incr backups: PostgreSQL's own incremental base backups (17+, ``summarize_wal = on``).

Backup side: the reference is found like a local one (``incremental.find_reference`` in remote mode:
the newest good remote backup of the same cluster and timeline, its chain complete) and must hold the
server's ``backup_manifest`` as an object of its own (``MANIFEST_OBJECT``; ``ops/physical.py`` keeps
it from every remote backup whose server could take incrementals).  The server must be PostgreSQL 17
or newer with ``summarize_wal`` on and WAL summaries reaching back to the reference's start LSN; else
the caller takes a full backup and records why.  The manifest goes to a private temporary file for
``pg_basebackup --incremental`` and is removed afterwards.

Restore side: ``ops/native_combine.py`` rebuilds the chain in one pass over its tars.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from saveit_backup.domain.manifest import Manifest
from saveit_backup.domain.wal import Lsn
from saveit_backup.errors import IntegrityError, NotFound
from saveit_backup.ops import incremental
from saveit_backup.pg.conn import ServerFacts, connect, server_facts
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository

log = logging.getLogger(__name__)

METHOD = "pg_basebackup"  # physical.incremental_method of remote diff/incr backups
MANIFEST_OBJECT = "backup_manifest"  # the server's backup manifest, stored beside the tar
MIN_MAJOR = 17


def server_blocker(conn: Any, facts: ServerFacts) -> str:
    """Why this server cannot take incremental base backups ('' when it can)."""
    if facts.major < MIN_MAJOR:
        return f"the server runs PostgreSQL {facts.major}; incremental base backups need PostgreSQL {MIN_MAJOR} or newer"
    row = conn.execute("SELECT current_setting('summarize_wal')").fetchone()
    if not row or row[0] != "on":
        return "summarize_wal is off on the server (ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf())"
    return ""


def unavailable(dsn: str) -> str:
    """``server_blocker`` of the server at ``dsn`` (connects once)."""
    conn = connect(dsn)
    try:
        return server_blocker(conn, server_facts(conn))
    finally:
        conn.close()


def _summaries_blocker(conn: Any, ref: incremental.Reference, timeline: int) -> str:
    """Why the server's WAL summaries cannot cover the changes since ``ref`` ('' when they can, or when we may not look)."""
    import psycopg

    try:
        row = conn.execute("SELECT min(start_lsn)::text FROM pg_available_wal_summaries() WHERE tli = %s", [timeline]).fetchone()
    except psycopg.Error:  # not allowed to look (superuser by default): pg_basebackup will tell
        return ""
    first = row[0] if row else None
    if first is None or int(Lsn.parse(first)) > ref.start_lsn:
        return (f"the server's WAL summaries on timeline {timeline} start at {first or '(none)'}, after the start of backup "
                f"{ref.manifest.id} ({Lsn(ref.start_lsn)}): summarize_wal was turned on later, or wal_summary_keep_time "
                "removed them")
    return ""


def find_reference(repo: Repository, conn: Any, facts: ServerFacts, kind: str,
                   timeline: int) -> tuple[incremental.Reference | None, str]:
    """The reference of a remote ``diff``/``incr``, or (None, why a full backup is taken instead)."""
    why = server_blocker(conn, facts)
    if why:
        return None, why
    ref, why = incremental.find_reference(repo, kind, facts.system_identifier, timeline, mode="remote")
    if ref is not None:
        why = _summaries_blocker(conn, ref, timeline)
    return (None, why) if why else (ref, "")


@contextmanager
def reference_manifest_file(repo: Repository, ref: Manifest) -> Iterator[str]:
    """The reference's stored backup_manifest in a private temporary file (mode 0600), removed on exit."""
    name = ref.physical.get("archive", {}).get("manifest_object") or MANIFEST_OBJECT
    fd, path = tempfile.mkstemp(prefix="saveit-manifest-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                for chunk in repo.read_object(layout.object_key(ref.id, name)):
                    out.write(chunk)
            except NotFound:
                raise IntegrityError(f"backup {ref.id} names its backup_manifest object {name}, but it is missing") from None
        yield path
    finally:
        os.unlink(path)
