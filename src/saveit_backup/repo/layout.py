"""Key names of the repository (docs/format.md, "Keys")."""

from __future__ import annotations

CONFIG = "config.json"
LOCK = "locks/repository.lock"
BACKUPS = "backups/"
WAL = "wal/"
PINS = "pins/"


def pin_key(backup_id: str) -> str:
    return f"{PINS}{backup_id}"


def backup_prefix(backup_id: str) -> str:
    return f"{BACKUPS}{backup_id}/"


def manifest_key(backup_id: str) -> str:
    return f"{BACKUPS}{backup_id}/manifest.json"


def object_key(backup_id: str, name: str) -> str:
    return f"{BACKUPS}{backup_id}/{name}"


def wal_key(name: str) -> str:
    """Segments by timeline and log file; history and backup-history files apart."""
    tli = name[:8]
    if len(name) == 24:
        return f"{WAL}{tli}/{name[:16]}/{name}"
    return f"{WAL}{tli}/history/{name}"
