"""`make demo`: a throwaway PostgreSQL, sample data, backup, verify, restore, compare.

Runs the real command line against a local repository, the embedded default.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from saveit_backup import sample
from saveit_backup.pg.cluster import Cluster, free_port


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="saveit-demo-"))
    cluster = Cluster(work / "pgdata", free_port(), socket_dir=work)
    cli = str(Path(sys.executable).parent / "saveit-backup")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "PG", "AWS_", "DATABASE_URL"))}
    env.update(BACKUP_REPOSITORY=f"file://{work}/repository", PGHOST=cluster.host, PGPORT=str(cluster.port),
               PGDATABASE="saveit", BACKUP_PG_BINDIR=cluster.bindir, BACKUP_ENVIRONMENT="demo")

    def step(title: str, *args: str) -> None:
        print(f"\n$ saveit-backup {shlex.join(args)}    # {title}", flush=True)
        subprocess.run([cli, *args], env=env, check=True)

    print(f"demo: starting a throwaway PostgreSQL in {work}", flush=True)
    cluster.initdb()
    cluster.start()
    try:
        import psycopg

        cluster.psql("CREATE DATABASE saveit")
        with psycopg.connect(cluster.dsn("saveit"), autocommit=True) as conn:
            sample.load(conn, readings=300_000)
            counts = sample.row_counts(conn)
        print("demo: loaded the runbook's tables: " + ", ".join(f"{t}={n}" for t, n in counts.items()), flush=True)
        step("logical backup into the local repository", "backup", "--type", "logical")
        step("list backups", "list")
        step("verify every object's size and checksum", "verify", "latest")
        step("restore into a second database and compare row counts", "restore", "latest",
             "--target-db", cluster.dsn("saveit_restore"), "--create")
        with psycopg.connect(cluster.dsn("saveit"), autocommit=True) as a, \
                psycopg.connect(cluster.dsn("saveit_restore"), autocommit=True) as b:
            same = sample.content_checksums(a) == sample.content_checksums(b)
        print(f"\ndemo: table contents (md5 of every row) equal in both databases: {same}")
        return 0 if same else 1
    finally:
        cluster.stop("fast")
        print(f"demo: stopped PostgreSQL; repository and logs kept in {work}")


if __name__ == "__main__":
    sys.exit(main())
