"""find_tool: a tool at least as new as the server, or exactly its major (pg_combinebackup, pg_ctl)."""

from __future__ import annotations

from pathlib import Path

import pytest

from saveit_backup.errors import PgVersionMismatch
from saveit_backup.pg.conn import find_tool


def fake_tool(bindir: Path, name: str, version: str) -> str:
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / name
    path.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) {version}'\n")
    path.chmod(0o755)
    return str(path)


def test_exact_major(tmp_path: Path) -> None:
    tool = fake_tool(tmp_path / "18", "pg_combinebackup", "18.6")
    assert find_tool("pg_combinebackup", str(tmp_path / "18"), 18, exact=True) == tool
    assert find_tool("pg_combinebackup", str(tmp_path / "18"), 17) == tool  # newer will do where exactness is not asked
    with pytest.raises(PgVersionMismatch, match="no pg_combinebackup of PostgreSQL 17"):
        find_tool("pg_combinebackup", str(tmp_path / "18"), 17, exact=True)
    with pytest.raises(PgVersionMismatch, match="older than the server"):
        find_tool("pg_combinebackup", str(tmp_path / "18"), 19)
