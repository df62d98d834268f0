"""Digests of plain bytes: BLAKE3 written, SHA-256 of format 1 still read (pure, in memory)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import blake3
import pytest

from saveit_backup.domain.manifest import MANIFEST_VERSION, Manifest, ObjectEntry
from saveit_backup.errors import IntegrityError, RepositoryFormatError, WalMismatch
from saveit_backup.ops.verify import verify_object
from saveit_backup.ops.wal_push import push_file
from saveit_backup.pipeline import digests
from saveit_backup.repo import layout
from saveit_backup.repo.repository import Repository
from saveit_backup.storage.memory import MemoryStorage
from tests.unit.test_wal_push_unit import segment

DATA = b"saveit" * 1000


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"digest": "blake3:00ff"}, "blake3:00ff"),
        ({"sha256": "00ff"}, "sha256:00ff"),  # format 1
        ({"digest": "blake3:00ff", "sha256": "11"}, "blake3:00ff"),
        ({"sha256": ""}, None),
        ({"digest": ""}, None),
        ({}, None),
    ],
)
def test_recorded(entry: dict[str, Any], expected: str | None) -> None:
    """None: the entry records no digest, which a manifest written by any version never does."""
    if expected is None:
        with pytest.raises(IntegrityError, match="records no digest"):
            digests.recorded(entry | {"path": "base/1/2"})
        assert digests.recorded(entry, required=False) == ""
    else:
        assert digests.recorded(entry) == digests.recorded(entry, required=False) == expected


@pytest.mark.parametrize(
    ("algorithm", "reference"),
    [("blake3", blake3.blake3(DATA).hexdigest()), ("sha256", hashlib.sha256(DATA).hexdigest())],
)
def test_each_algorithm_checks_its_own_digests(algorithm: str, reference: str) -> None:
    recorded = digests.of_bytes(DATA, algorithm)
    assert recorded == f"{algorithm}:{reference}"
    h = digests.like(recorded)
    h.update(DATA)
    assert digests.matches(h, recorded)
    h.update(b"x")
    assert not digests.matches(h, recorded)


@pytest.mark.parametrize("malformed", ["", "00ff", "blake3:", ":00ff"])
def test_unknown_or_malformed_digests_fail_loudly(malformed: str) -> None:
    with pytest.raises(RepositoryFormatError, match="'md5' is not supported"):
        digests.like("md5:00")
    with pytest.raises(IntegrityError, match="malformed digest"):
        digests.like(malformed)
    assert digests.of_bytes(DATA).startswith(digests.WRITE_ALGORITHM + ":")


def _v1_manifest(entry_digest: str) -> dict[str, Any]:
    body: dict[str, Any] = {"format_version": 1, "id": "20260101-000000F", "type": "full", "started": "2026-01-01T00:00:00.000000Z",
                            "objects": [{"name": "f000001", "size": len(DATA), "stored_size": 1, "sha256": entry_digest,
                                         "codec": "zstd", "cipher": "none"}]}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return body | {"checksum": hashlib.sha256(canonical.encode()).hexdigest()}


def test_format_1_manifest_is_read_and_its_objects_verified() -> None:
    repo = Repository(MemoryStorage())
    repo.init()
    repo.put_object(layout.object_key("20260101-000000F", "f000001"), [DATA])
    manifest = Manifest.from_dict(_v1_manifest(hashlib.sha256(DATA).hexdigest()))
    assert manifest.checksum_ok and manifest.objects[0].digest == "sha256:" + hashlib.sha256(DATA).hexdigest()
    assert verify_object(repo, manifest.id, manifest.objects[0]) is None
    damaged = Manifest.from_dict(_v1_manifest(hashlib.sha256(DATA + b"x").hexdigest()))
    assert "sha256 digest differs" in (verify_object(repo, damaged.id, damaged.objects[0]) or "")
    # shown again (``show --json``), it is still format 1, as format 1 records its objects
    shown = json.loads(manifest.to_json())
    assert shown["format_version"] == 1 and shown["objects"] == _v1_manifest(hashlib.sha256(DATA).hexdigest())["objects"]
    assert Manifest.from_dict(shown).checksum_ok
    new = Manifest("20260101-000001F", "full", "2026-01-01T00:00:01.000000Z", objects=[ObjectEntry("o", 1, 1, "blake3:00", "zstd", "none")])
    assert json.loads(new.to_json())["format_version"] == MANIFEST_VERSION == 2
    with pytest.raises(ValueError, match="format_version 3"):
        Manifest.from_dict(_v1_manifest("00") | {"format_version": 3})
    with pytest.raises(ValueError, match="malformed manifest"):
        Manifest.from_dict(_v1_manifest("00") | {"objects": [{"name": "x"}]})


def test_new_objects_record_blake3() -> None:
    repo = Repository(MemoryStorage())
    repo.init()
    digest = repo.put_object("x", [DATA[:100], DATA[100:]])
    entry = ObjectEntry("x", digest.plain_size, digest.stored_size, digest.plain_digest, digest.codec, digest.cipher)
    assert entry.digest == "blake3:" + blake3.blake3(DATA).hexdigest()


def test_wal_archived_with_a_format_1_header_digest_is_compared_by_sha256(tmp_path: Path) -> None:
    """A segment pushed by an older public-key-only host carries ``sha256`` in its header: a repeated push is
    compared with SHA-256, not refused for the algorithm."""
    repo = Repository(MemoryStorage())
    repo.init()
    seg = segment(tmp_path, 9, fill=5)
    plain = seg.read_bytes()
    header = json.dumps({"cipher": "none", "codec": "none", "sha256": hashlib.sha256(plain).hexdigest()}).encode()
    repo.storage.put(layout.wal_key(seg.name), struct.pack(">3sBI", b"SVB", 1, len(header)) + header + plain, if_absent=True)
    assert push_file(repo, str(seg)).status == "exists"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(WalMismatch, match="stored sha256"):
        push_file(repo, str(segment(other, 9, fill=6)))
