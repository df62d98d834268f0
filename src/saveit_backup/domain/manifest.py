"""Backup manifests: the commit record of a backup (pure data, no I/O)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

MANIFEST_VERSION = 2
# Version 1 recorded bare hex SHA-256 digests in fields named ``sha256``; version 2 records
# ``digest`` = "<algorithm>:<hex>" (BLAKE3 when written by this build).  Both are read.
MANIFEST_VERSIONS = (1, 2)
TYPE_LETTERS = {"logical": "L", "full": "F", "diff": "D", "incr": "I"}


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def backup_id(kind: str, started: datetime) -> str:
    return started.astimezone(UTC).strftime("%Y%m%d-%H%M%S") + TYPE_LETTERS[kind]


@dataclass
class ObjectEntry:
    name: str
    size: int
    stored_size: int
    digest: str  # of the plain bytes, "<algorithm>:<hex>" (pipeline.digests)
    codec: str
    cipher: str


@dataclass
class TableCount:
    database: str
    schema: str
    name: str
    rows: int

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class Manifest:
    id: str
    type: str
    started: str
    finished: str = ""
    pg_version: int = 0
    system_identifier: str = ""
    database: str = ""
    environment: str = ""
    host: str = ""
    tool_version: str = ""
    encryption: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    objects: list[ObjectEntry] = field(default_factory=list)
    tables: list[TableCount] = field(default_factory=list)
    parent: str | None = None
    physical: dict[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION
    checksum_ok: bool = field(default=True, compare=False)

    @property
    def plain_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def stored_bytes(self) -> int:
        return sum(o.stored_size for o in self.objects)

    @property
    def started_at(self) -> datetime:
        return parse_iso(self.started)

    @property
    def finished_at(self) -> datetime:
        return parse_iso(self.finished)

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds() if self.finished else 0.0

    def object(self, name: str) -> ObjectEntry:
        for entry in self.objects:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("checksum_ok")
        if self.format_version == 1:  # as read (``show``): its objects as format 1 recorded them, so its checksum holds
            for obj in body["objects"]:
                obj["sha256"] = obj.pop("digest").removeprefix("sha256:")
        body["plain_bytes"] = self.plain_bytes
        body["stored_bytes"] = self.stored_bytes
        body["checksum"] = _checksum(body)
        return body

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Manifest:
        """Parse; raises ValueError on an unknown version or malformed body."""
        version = body.get("format_version")
        if version not in MANIFEST_VERSIONS:
            raise ValueError(f"manifest format_version {version!r} is not supported (this build reads "
                             f"{', '.join(map(str, MANIFEST_VERSIONS))})")
        stored = body.get("checksum")
        rest = {k: v for k, v in body.items() if k != "checksum"}
        ok = stored == _checksum(rest)
        fields = {k: v for k, v in rest.items() if k in cls.__dataclass_fields__}
        try:
            fields["objects"] = [_object_entry(o) for o in body.get("objects", [])]
            fields["tables"] = [TableCount(**t) for t in body.get("tables", [])]
            manifest = cls(**fields)
        except (TypeError, KeyError, AttributeError) as exc:  # missing or unknown fields
            raise ValueError(f"malformed manifest: {exc}") from None
        manifest.checksum_ok = ok
        return manifest


def _object_entry(body: dict[str, Any]) -> ObjectEntry:
    """An ``objects`` item; format 1's ``sha256`` (bare hex) becomes a ``sha256:`` digest."""
    fields = dict(body)
    if "sha256" in fields:
        fields["digest"] = f"sha256:{fields.pop('sha256')}"
    return ObjectEntry(**fields)


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
