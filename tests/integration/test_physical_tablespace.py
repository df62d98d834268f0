"""Physical backups of an encrypted repository and a cluster with a tablespace, restored to a point in time.

The cluster archives with ``wal-push`` into a passphrase-encrypted repository; one table and its index
live in a tablespace outside the data directory.  The restored copy runs next to the original, so the
tablespace's original location is in use and the restore relocates it to ``<target>.tblspc/<oid>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from saveit_backup.pg.cluster import Cluster
from tests.fixtures.pg import Cli, archiving_cluster, stop_clusters
from tests.integration.test_physical import mark, stop, wait_archived

pytestmark = pytest.mark.pg

PASSPHRASE = "tablespace test passphrase"
CONTENT = "SELECT count(*), md5(string_agg(id::text || ':' || payload, ',' ORDER BY id)) FROM t_ts"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path, Cli]]:
    base = tmp_path_factory.mktemp("physts")
    cluster, _repo, cli = archiving_cluster(base, 1, config=f'encryption_passphrase = "{PASSPHRASE}"\n')
    (base / "ts1").mkdir()
    cluster.psql(f"CREATE TABLESPACE ts1 LOCATION '{base / 'ts1'}'")
    cluster.psql("CREATE TABLE t_ts (id int PRIMARY KEY USING INDEX TABLESPACE ts1, payload text) TABLESPACE ts1")
    cluster.psql("INSERT INTO t_ts SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
    yield cluster, base, cli
    stop_clusters(base, cluster)


def test_encrypted_backup_with_tablespace_restores_to_a_point_in_time(env: tuple[Cluster, Path, Cli]) -> None:
    cluster, base, cli = env
    cfg = str(base / "saveit.toml")
    out = json.loads(cli("--config", cfg, "--json", "backup", "--type", "full", "--pgdata", str(cluster.datadir)).stdout)
    p = out["physical"]
    oid = cluster.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")
    assert [t["oid"] for t in p["tablespaces"]] == [oid] and p["tablespace_map"].startswith(oid)
    ts_files = {f["path"]: f["size"] for f in p["files"] if f["path"].startswith(f"pg_tblspc/{oid}/")}
    assert len(ts_files) >= 2 and max(ts_files.values()) > 1 << 20, ts_files  # the table and its index, read in full
    assert {o["cipher"] for o in out["objects"]} == {"aes-256-gcm"}

    cluster.psql("INSERT INTO t_ts SELECT g, 'after backup' FROM generate_series(50001, 51000) g")
    at_mark = cluster.psql(CONTENT)
    target_time = mark(cluster).time
    cluster.psql("UPDATE t_ts SET payload = 'after the mark' WHERE id <= 100")
    wait_archived(cluster)

    wrong = cli("restore", "--target-dir", str(base / "r_wrong"), "--immediate", check=False,
                env={"BACKUP_ENCRYPTION_PASSPHRASE": "not the passphrase"})
    assert wrong.returncode != 0 and "SVB-410" in wrong.stderr, wrong.stderr

    target = base / "r_ts"
    res = cli("--config", cfg, "--json", "restore", "--target-dir", str(target), "--time", target_time,
              "--target-action", "pause", "--archive-mode", "off", "--start")
    report = json.loads(res.stdout)
    relocated = Path(f"{target}.tblspc") / oid
    assert report["tablespaces"] == [{"oid": oid, "location": str(relocated)}]
    restored = Cluster(Path(report["target_dir"]), int(report["port"]), cluster.bindir, Path(report["socket_dir"]))
    try:
        assert restored.psql(CONTENT) == at_mark
        assert restored.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'") == str(relocated)
        assert restored.psql("SELECT count(*) FROM t_ts WHERE payload = 'after the mark'") == "0"
        assert restored.psql("SHOW archive_mode") == "off"  # --archive-mode off: this copy never archives
        # the index in the tablespace is usable: an index scan finds a row
        plan = restored.psql("SET enable_seqscan = off; EXPLAIN SELECT payload FROM t_ts WHERE id = 42")
        assert "Index" in plan
    finally:
        stop(restored)
    assert cluster.psql(f"SELECT pg_tablespace_location({oid})") == str(base / "ts1")  # the original is untouched


def test_remote_mode_refuses_tablespaces_clearly(env: tuple[Cluster, Path, Cli]) -> None:
    _cluster, base, cli = env
    cfg = str(base / "saveit.toml")
    before = json.loads(cli("--config", cfg, "--json", "list").stdout)
    res = cli("--config", cfg, "backup", "--type", "full", "--remote", check=False)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "tablespace" in res.stderr, res.stderr
    assert json.loads(cli("--config", cfg, "--json", "list").stdout) == before  # nothing half-written became visible
