"""Logical backup and restore end to end, on a real server with the runbook's tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from saveit_backup import sample
from tests.fixtures.pg import Database, cli_for, new_database

pytestmark = pytest.mark.pg


def state(db: Database) -> tuple[dict[str, int], dict[str, str]]:
    with db.connect() as conn:
        return sample.row_counts(conn), sample.content_checksums(conn)


def test_backup_destroy_restore_same_database(runbook_db: Database, repo_dir: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    before = state(runbook_db)
    out = json.loads(cli("--json", "backup", "--type", "logical").stdout)
    assert out["type"] == "logical" and out["id"].endswith("L")
    tables = {t["name"]: t["rows"] for t in out["tables"]}
    assert tables == before[0]
    assert out["stored_bytes"] < out["plain_bytes"]  # compressed

    runbook_db.sql("DELETE FROM meter_readings WHERE id % 3 = 0; DROP TABLE users CASCADE;")
    assert runbook_db.sql("SELECT count(*) FROM meter_readings") == str(before[0]["meter_readings"] * 2 // 3)

    refused = cli("restore", "latest", "--target-db", runbook_db.dsn, check=False)
    assert refused.returncode == 14 and "SVB-610" in refused.stderr and "not empty" in refused.stderr

    res = cli("--json", "restore", "latest", "--target-db", runbook_db.dsn, "--clean")
    report = json.loads(res.stdout)
    assert report["ok"] and len(report["tables"]) == 5
    assert state(runbook_db) == before


def test_table_restore_into_other_database(runbook_db: Database, repo_dir: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    cli("backup", "--type", "logical", "-t", "users", "-t", "organizations")
    listed = json.loads(cli("--json", "list").stdout)
    assert len(listed["backups"]) == 1 and listed["encryption"] == "none"
    shown = json.loads(cli("--json", "show", "latest").stdout)
    assert {t["name"] for t in shown["tables"]} == {"users", "organizations"}

    target = new_database(runbook_db.cluster, "restore")
    res = cli("restore", "latest", "--target-db", target.dsn, "--table", "organizations", "--table", "users")
    assert "row counts: all equal" in res.stdout
    with runbook_db.connect() as a, target.connect() as b:
        tabs = ("users", "organizations")
        assert sample.content_checksums(a, tabs) == sample.content_checksums(b, tabs)
        assert sample.row_counts(b, tabs)["users"] == 500
        missing = b.execute("SELECT to_regclass('meter_readings')").fetchone()[0]
        assert missing is None


def test_create_new_database_and_export(runbook_db: Database, repo_dir: Path, tmp_path: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    bid = json.loads(cli("--json", "backup").stdout)["id"]
    new_name = f"created_{os.getpid()}"
    target = Database(runbook_db.cluster, new_name)
    res = cli("restore", bid, "--target-db", target.dsn, "--create", "--jobs", "1")
    assert "all equal" in res.stdout
    assert state(target) == state(runbook_db)

    # export: a pg_restore archive and a gzipped SQL script that standard tools load
    dump = tmp_path / "backup.dump"
    cli("export", bid, str(dump))
    listing = subprocess.run([runbook_db.cluster.tool("pg_restore"), "-l", str(dump)], capture_output=True, text=True, check=True)
    assert "TABLE DATA public meter_readings" in listing.stdout
    sqlgz = tmp_path / "backup.sql.gz"
    cli("export", bid, str(sqlgz))
    other = new_database(runbook_db.cluster, "sqlgz")
    subprocess.run(f"gunzip -c {sqlgz} | {runbook_db.cluster.tool('psql')} -X -q -v ON_ERROR_STOP=1 -h {other.cluster.host}"
                   f" -p {other.cluster.port} -d {other.name}", shell=True, check=True, capture_output=True)
    assert state(other) == state(runbook_db)


def test_all_databases_with_globals(database: Database, repo_dir: Path) -> None:
    database.sql("CREATE ROLE saveit_app_role; CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    cli = cli_for(database, f"file://{repo_dir}")
    out = json.loads(cli("--json", "backup", "--all-databases").stdout)
    names = {o["name"] for o in out["objects"]}
    assert "globals.sql" in names and f"db-{database.name}.dump" in names and "db-postgres.dump" in names
    globals_sql = repo_dir.parent / "globals.sql"
    cli("export", out["id"], str(globals_sql), "--database", "globals")
    assert "CREATE ROLE saveit_app_role" in globals_sql.read_text()
    target = new_database(database.cluster, "alldb")
    res = cli("restore", out["id"], "--database", database.name, "--target-db", target.dsn)
    assert "all equal" in res.stdout
    assert target.sql("SELECT sum(g) FROM t") == "500500"


def test_concurrent_backup_refused_by_lock(runbook_db: Database, repo_dir: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    cli("repo", "init")
    # Hold the lock from a live process, as a running backup would.
    holder = subprocess.Popen([cli.env.get("PYTHON", str(Path(os.sys.executable))), "-c",  # type: ignore[attr-defined]
                               "import sys,time; from saveit_backup.storage.local import LocalStorage;"
                               "from saveit_backup.repo.repository import Repository;"
                               f"r=Repository(LocalStorage('{repo_dir}'));"
                               "cm=r.lock('backup --type logical'); cm.__enter__(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        res = cli("backup", check=False)
        assert res.returncode == 4 and "SVB-210" in res.stderr and "locked by 'backup --type logical'" in res.stderr
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the lock is stale (pid gone) and is broken with a message.
    res = cli("backup")
    assert "breaking stale repository lock" in res.stderr
    assert len(json.loads(cli("--json", "list").stdout)["backups"]) == 1


def test_sigkill_mid_backup_leaves_nothing_visible(runbook_db: Database, repo_dir: Path) -> None:
    runbook_db.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 3000000) g")
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    cli("repo", "init")
    from tests.fixtures.pg import CLI

    proc = subprocess.Popen([CLI, "backup"], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def writing_data() -> bool:
        try:
            return any(p.name.endswith(".tmp-saveit") and p.stat().st_size > 1 << 20 for p in (repo_dir / "backups").rglob("*"))
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 60
    while not writing_data():  # wait until the dump is being written
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(cli("--json", "list").stdout)["backups"] == []
    res = cli("backup")  # the stale lock of the killed process is broken; the next backup succeeds
    assert "committed" in res.stdout
    assert len(json.loads(cli("--json", "list").stdout)["backups"]) == 1
    expired = json.loads(cli("--json", "expire").stdout)
    assert expired["uncommitted"] and not expired["delete"]
    assert [p for p in repo_dir.rglob("*") if p.is_file() and p.name.endswith(".tmp-saveit")] == []
    assert len(json.loads(cli("--json", "list").stdout)["backups"]) == 1


def test_expire_by_age_and_count_keeps_newest_and_pinned(database: Database, repo_dir: Path) -> None:
    database.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
    cli = cli_for(database, f"file://{repo_dir}")
    ids = []
    for _ in range(3):
        ids.append(json.loads(cli("--json", "backup").stdout)["id"])
        time.sleep(1.1)
    # Age every backup by 40 days: rewrite the committed manifests' times as an old repository would hold them.
    from saveit_backup.domain.manifest import Manifest, iso, parse_iso

    for bid in ids:
        path = repo_dir / "backups" / bid / "manifest.json"
        m = Manifest.from_dict(json.loads(path.read_text()))
        from datetime import timedelta

        m.started = iso(parse_iso(m.started) - timedelta(days=40))
        m.finished = iso(parse_iso(m.finished) - timedelta(days=40))
        path.chmod(0o600)
        path.write_bytes(m.to_json())
    cli("pin", ids[0])
    plan = json.loads(cli("--json", "expire", "--dry-run").stdout)
    reasons = {d["id"]: d["reason"] for d in plan["keep"]}
    assert [d["id"] for d in plan["delete"]] == [ids[1]]
    assert "pinned" in reasons[ids[0]] and "newest" in reasons[ids[2]]
    assert len(json.loads(cli("--json", "list").stdout)["backups"]) == 3  # dry run deleted nothing
    out = cli("expire")
    assert f"deleted {ids[1]}" in out.stdout and "30" in out.stdout
    assert [b["id"] for b in json.loads(cli("--json", "list").stdout)["backups"]] == [ids[0], ids[2]]
    assert not (repo_dir / "backups" / ids[1]).exists()
    # Count-based retention keeps the N newest whatever their age.
    cli("unpin", ids[0])
    plan = json.loads(cli("--json", "expire", "--dry-run", env={"BACKUP_RETENTION_COUNT": "2"}).stdout)
    assert plan["delete"] == []


def test_restore_snapshots_target_first_and_runs_hooks(database: Database, repo_dir: Path, tmp_path: Path) -> None:
    database.sql("CREATE TABLE accounts AS SELECT g AS id, g * 10 AS balance FROM generate_series(1, 1000) g")
    cli = cli_for(database, f"file://{repo_dir}")
    good = json.loads(cli("--json", "backup").stdout)["id"]
    time.sleep(1.1)
    database.sql("UPDATE accounts SET balance = 0 WHERE id <= 10")  # the mistake the restore undoes
    marks = tmp_path / "hooks.log"
    hooks = {"BACKUP_RESTORE_PRE_HOOK": f"echo \"pre $SAVEIT_BACKUP_ID\" >> {marks}",
             "BACKUP_RESTORE_POST_HOOK": f"echo post >> {marks}"}

    failing = cli("restore", good, "--target-db", database.dsn, "--clean", env={**hooks, "BACKUP_RESTORE_PRE_HOOK": "exit 3"},
                  check=False)
    assert failing.returncode == 14 and "pre-restore hook failed" in failing.stderr
    assert database.sql("SELECT count(*) FROM accounts WHERE balance = 0") == "10"  # untouched

    out = json.loads(cli("--json", "restore", good, "--target-db", database.dsn, "--clean", env=hooks).stdout)
    assert marks.read_text().split("\n")[:2] == [f"pre {good}", "post"]
    assert database.sql("SELECT count(*) FROM accounts WHERE balance = 0") == "0"
    snapshot = out["snapshot"]
    assert snapshot and snapshot != good
    # The snapshot holds the state before the restore: restoring it brings the mistake back.
    other = new_database(database.cluster, "snap")
    cli("restore", snapshot, "--target-db", other.dsn)
    assert other.sql("SELECT count(*) FROM accounts WHERE balance = 0") == "10"
