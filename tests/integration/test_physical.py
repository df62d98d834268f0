"""Physical backups (local and remote mode) and point-in-time recovery on a real archiving cluster.

One cluster per module: archive_mode=on with ``archive_command = 'BACKUP_CONFIG=cfg <CLI> wal-push %p'``,
data checksums on, a pgbench database (scale 3).  Marks are taken while no pgbench runs, so the row count
of pgbench_history at a mark is exact; every recovered cluster must hold exactly that count and satisfy
pgbench's balance invariant.  Recovered clusters that are only inspected pause at the target (no promotion:
a promoted copy would archive a new timeline into the shared repository); the timeline test promotes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from saveit_backup.pg.cluster import Cluster
from tests.fixtures.pg import CLI, Cli, archiving_cluster, stop_clusters

pytestmark = pytest.mark.pg

SCALE = 3


@dataclass
class Mark:
    time: str
    count: int
    lsn: str


@dataclass
class Env:
    cluster: Cluster
    base: Path
    repo: Path
    cli: Cli
    marks: dict[str, Mark]
    backups: dict[str, str]


def pgbench(cluster: Cluster, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([cluster.tool("pgbench"), "-h", cluster.host, "-p", str(cluster.port), *args, "postgres"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_pgbench(cluster: Cluster, seconds: int) -> None:
    proc = pgbench(cluster, "-c", "2", "-T", str(seconds), "-n")
    _, err = proc.communicate(timeout=seconds + 60)
    assert proc.returncode == 0, err.decode()


def mark(cluster: Cluster) -> Mark:
    row = cluster.psql("SELECT clock_timestamp(), (SELECT count(*) FROM pgbench_history), pg_current_wal_insert_lsn()").split("|")
    time.sleep(0.05)  # commits after the mark get a later timestamp
    return Mark(row[0], int(row[1]), row[2])


def wait_archived(cluster: Cluster, timeout: float = 60) -> None:
    """Switch WAL and wait until the archiver has nothing pending."""
    cluster.psql("SELECT pg_switch_wal()")
    status = cluster.datadir / "pg_wal" / "archive_status"
    deadline = time.monotonic() + timeout
    while any(n.endswith(".ready") for n in os.listdir(status)):
        assert time.monotonic() < deadline, cluster.psql("SELECT failed_count, last_failed_wal FROM pg_stat_archiver")
        time.sleep(0.1)


def invariant(cluster: Cluster) -> None:
    sums = cluster.psql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),"
                        " (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
    values = sums.split("|")
    assert len(set(values)) == 1, f"pgbench balances differ: {values}"


def recovered(env: Env, restore_out: str) -> Cluster:
    report = json.loads(restore_out)
    assert report["started"], report
    return Cluster(Path(report["target_dir"]), int(report["port"]), env.cluster.bindir, Path(report["socket_dir"]))


def restore(env: Env, name: str, *args: str) -> tuple[Cluster, dict[str, object]]:
    target = env.base / name
    res = env.cli("--json", "restore", *args, "--target-dir", str(target), "--start")
    return recovered(env, res.stdout), json.loads(res.stdout)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("phys")
    cluster, repo, cli = archiving_cluster(base, SCALE)
    yield Env(cluster, base, repo, cli, {}, {})
    stop_clusters(base, cluster)


def stop(c: Cluster) -> None:
    subprocess.run([c.tool("pg_ctl"), "-D", str(c.datadir), "-m", "fast", "-w", "stop"], capture_output=True, check=False)


def test_local_full_backup_under_load_then_pitr(env: Env) -> None:
    c = env.cluster
    load = pgbench(c, "-c", "2", "-T", "6", "-n")  # the backup runs while pgbench writes
    try:
        out = json.loads(env.cli("--json", "backup", "--type", "full", "--pgdata", str(c.datadir)).stdout)
    finally:
        assert load.wait(timeout=60) == 0
    env.backups["local"] = out["id"]
    p = out["physical"]
    assert out["type"] == "full" and out["id"].endswith("F") and p["mode"] == "local"
    assert p["data_checksums"] and p["checksums"]["pages_checked"] > 1000 and p["checksums"]["bad_pages"] == 0
    assert "START WAL LOCATION" in p["backup_label"] and p["wal"][0] == p["start_wal"]
    files = {f["path"]: f for f in p["files"]}
    assert "PG_VERSION" in files and "global/pg_control" in files and not any(f.startswith("pg_wal/") for f in files)
    assert "postmaster.pid" not in files
    objects = {o["name"] for o in out["objects"]}
    assert {f"wal/{w}" for w in p["wal"]} <= objects
    packs = [o for o in objects if o.startswith("p")]
    assert len(packs) < len(files) / 10  # small files are bundled
    assert out["stored_bytes"] < out["plain_bytes"]

    env.marks["m1"] = mark(c)
    run_pgbench(c, 2)
    c.psql("SELECT pg_create_restore_point('mark2')")
    env.marks["m2"] = mark(c)
    run_pgbench(c, 2)
    env.marks["m3"] = mark(c)
    run_pgbench(c, 1)
    wait_archived(c)
    assert env.marks["m1"].count < env.marks["m2"].count < env.marks["m3"].count

    for name, args in (("m1", ["--time", env.marks["m1"].time]), ("m2", ["--name", "mark2"]), ("m3", ["--lsn", env.marks["m3"].lsn])):
        r, report = restore(env, f"r_{name}", *args, "--target-action", "pause")
        try:
            assert r.psql("SELECT count(*) FROM pgbench_history") == str(env.marks[name].count), (name, report)
            invariant(r)
            reached = report["reached"]
            assert isinstance(reached, dict) and reached["state"] == "paused at the target" and reached["timeline"] == 1
        finally:
            stop(r)

    verify = json.loads(env.cli("--json", "verify", "--all", "--wal").stdout)
    assert all(b["ok"] for b in verify["backups"]) and verify["problems"] == []
    assert verify["pitr_window"]["earliest"] <= verify["pitr_window"]["latest"]


def test_restore_refuses_non_empty_target(env: Env) -> None:
    target = env.base / "r_busy"
    target.mkdir()
    (target / "something").write_text("x")
    res = env.cli("restore", "--target-dir", str(target), check=False)
    assert res.returncode == 14 and "not empty" in res.stderr
    res = env.cli("restore", "--target-dir", str(target), "--force", "--immediate")
    assert (target / "recovery.signal").exists() and not (target / "something").exists()
    conf = (target / "postgresql.auto.conf").read_text()
    assert "wal-fetch --abort-on-error --repo" in conf and "recovery_target = 'immediate'" in conf


def assert_consistent_at(env: Env, name: str, backup_id: str, history_rows: str) -> None:
    """Recover ``backup_id`` to its consistent point: exactly ``history_rows`` pgbench_history rows, balances agree."""
    r, _ = restore(env, name, backup_id, "--immediate", "--target-action", "pause")
    try:
        assert r.psql("SELECT count(*) FROM pgbench_history") == history_rows
        invariant(r)
    finally:
        stop(r)


def test_remote_full_backup(env: Env) -> None:
    c = env.cluster
    # No --pgdata and no file access: pg_basebackup over the replication protocol.
    out = json.loads(env.cli("--json", "backup", "--type", "full", "--remote").stdout)
    p = out["physical"]
    assert p["mode"] == "remote" and p["files"] == [] and p["archive"]["content"] in ("tar", "tar.zst")
    at_backup = c.psql("SELECT count(*) FROM pgbench_history")
    run_pgbench(c, 1)
    wait_archived(c)
    assert_consistent_at(env, "r_remote", out["id"], at_backup)


def test_remote_backup_retries_without_wal_when_the_server_recycled_it(env: Env) -> None:
    # pg_basebackup -X fetch fails when the server removed a segment before sending it: the backup is taken
    # again with -X none (WAL from the archive only) and restores as any other.
    fake = env.base / "fakebin"
    fake.mkdir()
    for tool in Path(env.cluster.bindir).iterdir():
        if tool.name != "pg_basebackup":
            (fake / tool.name).symlink_to(tool)
    script = fake / "pg_basebackup"
    script.write_text("#!/bin/sh\n"
                      'case " $* " in *" fetch "*) echo "pg_basebackup: error: could not get COPY data stream: ERROR:  '
                      'requested WAL segment 000000010000000000000007 has already been removed" >&2; exit 1;; esac\n'
                      f'exec {Path(env.cluster.bindir) / "pg_basebackup"} "$@"\n')
    script.chmod(0o755)
    res = env.cli("--json", "backup", "--type", "full", "--remote", env={"BACKUP_PG_BINDIR": str(fake)})
    out = json.loads(res.stdout)
    assert "taking the backup again without WAL in the tar (-X none)" in res.stderr
    assert out["physical"]["backup_label"].find(f"saveit-backup {out['id']} (-X none)") >= 0
    at_backup = env.cluster.psql("SELECT count(*) FROM pgbench_history")
    assert_consistent_at(env, "r_remote_retry", out["id"], at_backup)


def test_remote_incr_before_postgresql_17_falls_back(env: Env) -> None:
    res = env.cli("--json", "backup", "--type", "incr", "--remote")
    out = json.loads(res.stdout)
    assert out["type"] == "full" and out["parent"] is None and out["options"]["requested"] == "incr"
    assert "need PostgreSQL 17 or newer" in out["options"]["fallback"] and "took a full backup instead" in res.stderr


def test_timelines_promote_write_and_recover_latest(env: Env) -> None:
    m2 = env.marks["m2"]
    # Recover to mark2 and promote: timeline 2, archived into the same repository by the recovered server.
    r, report = restore(env, "r_tl2", env.backups["local"], "--name", "mark2", "--target-action", "promote")
    try:
        reached = report["reached"]
        assert isinstance(reached, dict) and reached["state"] == "promoted" and reached["timeline"] == 2
        assert r.psql("SELECT count(*) FROM pgbench_history") == str(m2.count)
        r.psql("CREATE TABLE after_branch AS SELECT g FROM generate_series(1, 1000) g")
        wait_archived(r, timeout=30)
    finally:
        stop(r)
    # Recover again from the same full backup to the end of the archive: follows timeline 2.
    r3, report3 = restore(env, "r_tl3", env.backups["local"], "--target-action", "promote")
    try:
        assert r3.psql("SELECT count(*) FROM after_branch") == "1000"
        assert r3.psql("SELECT count(*) FROM pgbench_history") == str(m2.count)
        invariant(r3)
        reached = report3["reached"]
        assert isinstance(reached, dict) and reached["timeline"] == 3
    finally:
        stop(r3)


def test_service_schedules_physical_full_and_incremental(env: Env) -> None:
    """`serve` with BACKUP_PGDATA: the full and incremental jobs take physical backups (issue 5 grows with them)."""
    import signal
    import time
    import urllib.request

    from saveit_backup.pg.cluster import free_port as port

    before = {b["id"] for b in json.loads(env.cli("--json", "list").stdout)["backups"]}
    http = port()
    serve_env = {**env.cli.env, "BACKUP_PGDATA": str(env.cluster.datadir), "BACKUP_SCHEDULE_FULL": "*/12 * * * * *",
                 "BACKUP_SCHEDULE_INCREMENTAL": "*/5 * * * * *", "BACKUP_SCHEDULE_LOGICAL": "", "BACKUP_SCHEDULE_VERIFY": "",
                 "BACKUP_SCHEDULE_RESTORE_TEST": "", "BACKUP_HTTP_PORT": str(http)}
    proc = subprocess.Popen([CLI, "serve", "--refresh", "1"], env=serve_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        kinds: set[str] = set()
        while time.monotonic() < deadline and not {"full", "incr"} <= kinds:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(2)
            listed = json.loads(env.cli("--json", "list").stdout)["backups"]
            kinds = {b["type"] for b in listed if b["id"] not in before}
        assert {"full", "incr"} <= kinds, kinds
        time.sleep(2)  # one metrics refresh
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'saveit_backup_last_success_timestamp_seconds{type="incr"}' in metrics
        assert 'saveit_backup_last_success_timestamp_seconds{type="full"}' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    new = [b for b in json.loads(env.cli("--json", "list").stdout)["backups"] if b["id"] not in before]
    assert all(b["status"] == "ok" for b in new)
    incr = [b for b in new if b["type"] == "incr"]
    assert incr and incr[0]["parent"] is not None
