"""The tar-stream observer that keeps pg_basebackup's backup_manifest."""

from __future__ import annotations

import io
import tarfile

import pytest

from saveit_backup.pipeline.tartap import TarMemberTap


def archive(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 1 << 20])
def test_keeps_the_member_and_passes_bytes_unchanged(chunk: int) -> None:
    manifest = b'{"PostgreSQL-Backup-Manifest-Version": 2}' * 50
    raw = archive([("base/1/1259", bytes(range(256)) * 33), ("./backup_manifest.old", b"x"), ("global/pg_control", b"c" * 8192),
                   ("backup_manifest", manifest)])
    tap = TarMemberTap("backup_manifest")
    out = b"".join(tap.observe(raw[i : i + chunk] for i in range(0, len(raw), chunk)))
    assert out == raw
    assert tap.content == manifest


def test_absent_member_and_limit() -> None:
    tap = TarMemberTap("backup_manifest")
    b"".join(tap.observe([archive([("PG_VERSION", b"18\n")])]))
    assert tap.content is None
    tap = TarMemberTap("backup_manifest", limit=10)
    with pytest.raises(Exception, match="more than"):
        b"".join(tap.observe([archive([("backup_manifest", b"y" * 11)])]))


def test_pax_prefix_and_empty() -> None:
    long_dir = "d" * 120
    raw = archive([(f"{long_dir}/f", b"z" * 600), ("backup_manifest", b"")], fmt=tarfile.PAX_FORMAT)
    tap = TarMemberTap("backup_manifest")
    b"".join(tap.observe([raw]))
    assert tap.content == b""
