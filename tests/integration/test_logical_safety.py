"""Encryption in both key modes, corruption found by verify, fallback of `restore latest`, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from saveit_backup import sample
from tests.fixtures.pg import Database, cli_for, new_database

pytestmark = pytest.mark.pg


def counts(db: Database) -> dict[str, int]:
    with db.connect() as conn:
        return sample.row_counts(conn)


def test_passphrase_encryption_round_trip_and_wrong_key(runbook_db: Database, repo_dir: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    env = {"BACKUP_ENCRYPTION_PASSPHRASE": "correct horse battery staple"}
    out = json.loads(cli("--json", "backup", env=env).stdout)
    assert out["encryption"] == "aes-256-gcm"
    assert json.loads(cli("--json", "list").stdout)["encryption"] == "aes-256-gcm"  # listing needs no key
    # The stored bytes are not readable: no table name or e-mail address in clear.
    blob = (repo_dir / "backups" / out["id"] / "database.dump").read_bytes()
    assert b"@example.com" not in blob and b"meter_readings" not in blob

    wrong = cli("verify", "latest", env={"BACKUP_ENCRYPTION_PASSPHRASE": "wrong"}, check=False)
    assert wrong.returncode == 9 and "does not open this object" in wrong.stdout
    target = new_database(runbook_db.cluster, "enc")
    bad = cli("restore", "latest", "--target-db", target.dsn, "--no-fallback", env={"BACKUP_ENCRYPTION_PASSPHRASE": "wrong"},
              check=False)
    assert bad.returncode != 0 and "SVB-" in bad.stderr
    assert target.sql("SELECT count(*) FROM pg_class WHERE relname = 'users'") == "0"  # nothing restored from garbage

    nokey = cli("backup", check=False)  # encrypted repository, no key configured: refused, not stored in clear
    assert nokey.returncode == 10 and "SVB-411" in nokey.stderr

    res = cli("restore", "latest", "--target-db", target.dsn, env=env)
    assert "all equal" in res.stdout
    assert counts(target) == counts(runbook_db)


def test_recipient_encryption_writer_cannot_read(runbook_db: Database, repo_dir: Path, tmp_path: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    identity = tmp_path / "restore.key"
    public = cli("key", "generate", "--out", str(identity)).stdout.strip()
    assert public.startswith("saveit-pub-") and oct(identity.stat().st_mode)[-3:] == "600"
    writer = {"BACKUP_ENCRYPTION_RECIPIENTS": public}
    cli("backup", env=writer)
    # The writing host holds only the public key: it cannot read what it wrote.
    denied = cli("verify", "latest", env=writer, check=False)
    assert denied.returncode == 9 and "no matching key is configured" in denied.stdout
    other_identity = tmp_path / "other.key"
    cli("key", "generate", "--out", str(other_identity))
    wrong = cli("verify", "latest", env={"BACKUP_ENCRYPTION_IDENTITY": str(other_identity)}, check=False)
    assert wrong.returncode == 9
    reader = {"BACKUP_ENCRYPTION_IDENTITY": str(identity)}
    assert "ok" in cli("verify", "latest", env=reader).stdout
    target = new_database(runbook_db.cluster, "rcpt")
    assert "all equal" in cli("restore", "latest", "--target-db", target.dsn, env=reader).stdout


def test_corrupt_object_found_and_latest_falls_back(runbook_db: Database, repo_dir: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    first = json.loads(cli("--json", "backup").stdout)["id"]
    runbook_db.sql("INSERT INTO organizations (name) VALUES ('added after first backup')")
    import time

    time.sleep(1.1)  # backup IDs have one-second resolution
    second = json.loads(cli("--json", "backup").stdout)["id"]
    obj = repo_dir / "backups" / second / "database.dump"
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle of the stored object
    os.chmod(obj, 0o600)
    obj.write_bytes(bytes(raw))

    res = cli("verify", "--all", check=False)
    assert res.returncode == 9
    assert f"{first}: ok" in res.stdout and f"{second}: FAILED" in res.stdout
    assert "CORRUPT/MISSING database.dump" in res.stdout

    target = new_database(runbook_db.cluster, "fallback")
    strict = cli("restore", "latest", "--target-db", target.dsn, "--no-fallback", check=False)
    assert strict.returncode == 9 and second in strict.stderr
    res = cli("restore", "latest", "--target-db", target.dsn)
    assert f"WARNING: backup {second} fails verification" in res.stderr
    assert f"restored backup {first}" in res.stdout and "all equal" in res.stdout
    assert target.sql("SELECT count(*) FROM organizations") == "20"  # the first backup's state

    # A missing object is named too.
    obj.unlink()
    res = cli("verify", second, check=False)
    assert res.returncode == 9 and "database.dump" in res.stdout and "not found" in res.stdout


def test_environment_mismatch_refused(database: Database, repo_dir: Path) -> None:
    database.sql("CREATE TABLE t AS SELECT 1 AS x")
    cli = cli_for(database, f"file://{repo_dir}")
    cli("backup", env={"BACKUP_ENVIRONMENT": "prod"})
    target = new_database(database.cluster, "staging")
    res = cli("restore", "latest", "--target-db", target.dsn, env={"BACKUP_ENVIRONMENT": "staging"}, check=False)
    assert res.returncode == 14 and "environment 'prod'" in res.stderr
    ok = cli("restore", "latest", "--target-db", target.dsn, "--allow-environment-mismatch", env={"BACKUP_ENVIRONMENT": "staging"})
    assert "all equal" in ok.stdout


def test_troubleshooting_errors_are_one_clear_line(database: Database, repo_dir: Path, tmp_path: Path) -> None:
    cli = cli_for(database, f"file://{repo_dir}")
    # Database unreachable (the password must not leak into the message).
    res = cli("backup", "--dbname", "postgresql://u:s3cret-pw@127.0.0.1:1/x", check=False)
    assert res.returncode == 11 and "SVB-500" in res.stderr and "s3cret-pw" not in res.stderr + res.stdout
    assert len(res.stderr.strip().splitlines()) == 1
    # pg_dump older than the server.
    old = tmp_path / "oldbin"
    old.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        (old / tool).write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
        (old / tool).chmod(0o755)
    res = cli("backup", env={"BACKUP_PG_BINDIR": str(old)}, check=False)
    assert res.returncode == 12 and "SVB-511" in res.stderr and "older than the server" in res.stderr
    # Permission denied on the repository.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    res = cli("backup", env={"BACKUP_REPOSITORY": f"file://{locked}/repo"}, check=False)
    assert res.returncode == 6 and "SVB-310" in res.stderr and "permission denied" in res.stderr
    # Unknown setting value.
    res = cli("backup", env={"BACKUP_RETENTION_DAYS": "thirty"}, check=False)
    assert res.returncode == 2 and "BACKUP_RETENTION_DAYS" in res.stderr
    # Backup that does not exist.
    cli("repo", "init", "--exist-ok")
    res = cli("restore", "20200101-000000L", "--target-db", database.dsn, check=False)
    assert res.returncode == 13 and "SVB-600" in res.stderr
