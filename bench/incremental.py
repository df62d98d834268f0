"""Full, differential and incremental physical backups: saveit-backup against pgBackRest (issue 4).

One archiving cluster (pgbench, ``--scale`` 100 by default) whose archive_command pushes every WAL
segment to both tools.  Steps: full backup with each tool; ``--transactions`` pgbench transactions; diff
with each; as many transactions again; incr with each.  Reported per step and tool: wall time, CPU time,
bytes stored for the backup's data files (pgBackRest: ``info`` repository delta; saveit-backup: the
backup's objects without the copy of its own WAL, which pgBackRest keeps only in its archive) and bytes
stored including that WAL copy.  The order of the two tools alternates per step.

    python bench/incremental.py [--scale 100] [--transactions 40000] [--workdir /var/tmp] [--no-write]

Needs ``pgbackrest`` on PATH (Debian: ``apt-get install -y pgbackrest``).  Started as root, it re-runs
itself as the postgres OS user.  Writes the section "Incremental backups (issue 4)" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
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

from saveit_backup.pg.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
TITLE = "Incremental backups (issue 4)"


def pgbackrest_conf(path: Path, repo: Path, cluster: Cluster, work: Path) -> None:
    path.write_text("[global]\n"
                    f"repo1-path={repo}\n"
                    "repo1-retention-full=10\n"
                    "process-max=2\n"
                    "compress-type=zst\n"
                    "compress-level=3\n"
                    "start-fast=y\n"
                    "log-level-console=warn\n"
                    "log-level-file=off\n"
                    f"lock-path={work / 'pgbr-lock'}\n"
                    f"spool-path={work / 'pgbr-spool'}\n"
                    "\n[bench]\n"
                    f"pg1-path={cluster.datadir}\n"
                    f"pg1-socket-path={cluster.host}\n"
                    f"pg1-port={cluster.port}\n")


OURS, PLAIN = "saveit-backup", "saveit-backup, XOR off"
TOOLS = [OURS, "pgBackRest", PLAIN]


def run_pgbench(cluster: Cluster, dbname: str, transactions: int) -> None:
    clients = 4
    log(f"pgbench: {transactions} transactions")
    subprocess.run([cluster.tool("pgbench"), "-h", cluster.host, "-p", str(cluster.port), "-n", "-c", str(clients), "-j", "2",
                    "-t", str(max(1, transactions // clients)), dbname], check=True, capture_output=True)


def ours(cluster: Cluster, env: dict[str, str], kind: str) -> tuple[Sample, dict[str, int]]:
    s = measure([CLI, "--json", "backup", "--type", kind, "--pgdata", str(cluster.datadir)], env)
    if s.returncode != 0:
        raise SystemExit(f"saveit-backup backup --type {kind} failed: {s.stderr[-800:]}")
    m = json.loads(s.stdout)
    if m["type"] != kind:
        raise SystemExit(f"saveit-backup took a {m['type']} backup instead of {kind}: {m['options']}")
    data = sum(o["stored_size"] for o in m["objects"] if not o["name"].startswith("wal/"))
    inc = m["physical"].get("incremental", {})
    return s, {"data": data, "total": int(m["stored_bytes"]), "pages": int(inc.get("pages_stored", 0)), "id": m["id"]}


def pgbackrest(conf: Path, kind: str) -> tuple[Sample, dict[str, int]]:
    s = measure(["pgbackrest", f"--config={conf}", "--stanza=bench", f"--type={kind}", "backup"])
    if s.returncode != 0:
        raise SystemExit(f"pgbackrest backup --type={kind} failed: {s.stderr[-800:]} {s.stdout[-800:]}")
    info = subprocess.run(["pgbackrest", f"--config={conf}", "--stanza=bench", "--output=json", "info"],
                          capture_output=True, text=True, check=True)
    last = json.loads(info.stdout)[0]["backup"][-1]
    data = int(last["info"]["repository"]["delta"])
    return s, {"data": data, "total": data}


def drain_archive(cluster: Cluster, timeout: float = 900.0) -> None:
    """Switch WAL and wait until PostgreSQL's archiver has nothing left to push (both tools' archives)."""
    cluster.psql("SELECT pg_switch_wal()")
    status = cluster.datadir / "pg_wal" / "archive_status"
    deadline = time.monotonic() + timeout
    while any(n.endswith(".ready") for n in os.listdir(status)):
        if time.monotonic() > deadline:
            raise SystemExit("the archiver did not catch up: " + cluster.psql("SELECT last_failed_wal FROM pg_stat_archiver"))
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--transactions", type=int, default=40_000)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--no-write", action="store_true", help="print the section, do not update docs/benchmarks.md")
    ap.add_argument("--keep", action="store_true", help="keep the repositories (the work directory) for a look afterwards")
    args = ap.parse_args()
    reexec_as_postgres()
    if not shutil.which("pgbackrest"):
        raise SystemExit("pgbackrest is not installed (apt-get install -y pgbackrest)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="saveit-bench-incr-", dir=args.workdir))
    try:
        our_repo, pgbr_repo, pgbr_conf, cfg = work / "saveit", work / "pgbr", work / "pgbackrest.conf", work / "saveit.toml"
        plain_cfg = work / "saveit-plain.toml"  # the same backups without page XOR (BACKUP_INCREMENTAL_XOR=off)
        pgbr_repo.mkdir()
        cfg.write_text(f'repository = "file://{our_repo}"\n')
        plain_cfg.write_text(f'repository = "file://{work / "saveit-plain"}"\n')
        archive = (f"BACKUP_CONFIG={cfg} {CLI} wal-push %p && BACKUP_CONFIG={plain_cfg} {CLI} wal-push %p"
                   f" && pgbackrest --config={pgbr_conf} --stanza=bench archive-push %p")
        conf = {"archive_mode": "on", "archive_command": f"'{archive}'", "checkpoint_timeout": "'30min'", "max_wal_size": "'4GB'"}
        with throwaway_cluster(args.workdir, extra_conf=conf) as cluster:
            pgbackrest_conf(pgbr_conf, pgbr_repo, cluster, work)
            env = clean_env(BACKUP_CONFIG=str(cfg), PGHOST=cluster.host, PGPORT=str(cluster.port), PGDATABASE="postgres",
                            BACKUP_PG_BINDIR=cluster.bindir)
            envs = {OURS: env, PLAIN: dict(env, BACKUP_CONFIG=str(plain_cfg), BACKUP_INCREMENTAL_XOR="off")}
            log(f"pgbench -i -s {args.scale}")
            pgbench_init(cluster, "postgres", args.scale)
            db_size = int(cluster.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
            subprocess.run(["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench", "stanza-create"], check=True,
                           capture_output=True)
            rows: list[tuple[str, str, Sample, dict[str, int]]] = []
            ids: dict[str, str] = {}  # our newest backup per contender
            for step, kind in enumerate(("full", "diff", "incr")):
                if kind != "full":
                    run_pgbench(cluster, "postgres", args.transactions)
                order = TOOLS[step % len(TOOLS):] + TOOLS[:step % len(TOOLS)]
                for tool in order:
                    drain_archive(cluster)  # neither tool waits for WAL the other tool's turn produced
                    log(f"{kind}: {tool}")
                    sample, sizes = ours(cluster, envs[tool], kind) if tool in envs else pgbackrest(pgbr_conf, kind)
                    if tool in envs:
                        ids[tool] = str(sizes.pop("id"))
                    log(f"{kind}: {tool}: {sample.wall:.1f} s, {sizes['data'] / MB:.1f} MB stored")
                    rows.append((kind, tool, sample, sizes))
            restores: list[tuple[str, Sample]] = []
            for tool in TOOLS:  # the incr's whole chain, files only (no server start), into an empty directory
                target = work / "restore"
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(mode=0o700)
                if tool in envs:
                    command = [CLI, "restore", ids[tool], "--target-dir", str(target), "--force", "--immediate"]
                else:
                    command = ["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench", f"--pg1-path={target}", "restore",
                               "--type=immediate"]
                log(f"restore incr chain: {tool}")
                sample = measure(command, envs.get(tool, clean_env()))
                if sample.returncode != 0:
                    raise SystemExit(f"{tool} restore failed: {sample.stderr[-800:]}")
                log(f"restore incr chain: {tool}: {sample.wall:.1f} s")
                restores.append((tool, sample))
            shutil.rmtree(work / "restore", ignore_errors=True)
            version = subprocess.run(["pgbackrest", "version"], capture_output=True, text=True).stdout.strip()
            body = report(rows, restores, args, db_size, pg_version(cluster), version)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(body)
    if not args.no_write:
        update_section(ROOT / "docs" / "benchmarks.md", TITLE, body)
        log("updated docs/benchmarks.md")


def report(rows: list[tuple[str, str, Sample, dict[str, int]]], restores: list[tuple[str, Sample]], args: argparse.Namespace,
           db_size: int, pg: str, pgbr_version: str) -> str:
    lines = [
        f"Measured {today()} on {machine_description()}; PostgreSQL {pg}, {pgbr_version}; pgbench scale {args.scale} "
        f"({db_size / MB:,.0f} MB of databases), {args.transactions:,} pgbench transactions (4 clients) before the diff and "
        f"again before the incr; both tools: 2 processes/threads, zstd level 3, local repository on the same disk.",
        "",
        f"Command: `{command_line()}`",
        "",
        "Stored = bytes written to the repository for the backup's files (compressed). saveit-backup also copies the WAL "
        "between the backup's start and stop into the backup (\"with WAL\"); pgBackRest keeps that WAL only in its archive "
        "(archive-copy=n), so the data columns compare like with like. pgBackRest 2.45 diff/incr store changed files whole; "
        "saveit-backup stores only the 8 KiB pages whose LSN is at or after the reference backup's start, each as its XOR "
        "with the reference's copy of the page (read back from the repository); the \"XOR off\" rows are the same backups "
        "with plain pages (`BACKUP_INCREMENTAL_XOR=off`), in a repository of their own.",
        "",
        "| Backup | Tool | Time (s) | CPU (s) | Stored, data (MB) | Stored, with WAL (MB) | Data vs pgBackRest | Time vs pgBackRest |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(k, t): (s, z) for k, t, s, z in rows}
    for kind in ("full", "diff", "incr"):
        peer_s, peer_z = by[(kind, "pgBackRest")]
        for tool in TOOLS:
            s, z = by[(kind, tool)]
            lines.append(f"| {kind} | {tool} | {s.wall:.1f} | {s.cpu:.1f} | {z['data'] / MB:,.1f} | {z['total'] / MB:,.1f} | "
                         f"{z['data'] / max(1, peer_z['data']):.3f}x | {s.wall / max(1e-9, peer_s.wall):.2f}x |")
    peer = dict(restores)["pgBackRest"]
    lines += ["", "Restore of the incr's chain (full, diff, incr), files only, no server start:", "",
              "| Tool | Time (s) | CPU (s) | Peak RSS (MB) | Time vs pgBackRest |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {tool} | {s.wall:.1f} | {s.cpu:.1f} | {s.peak_tree_rss / MB:.0f} | {s.wall / max(1e-9, peer.wall):.2f}x |"
              for tool, s in restores]
    s_i, z_i = by[("incr", OURS)]
    p_i, pz_i = by[("incr", "pgBackRest")]
    size_ok = z_i["data"] <= 0.3 * pz_i["data"]
    time_ok = s_i.wall <= p_i.wall
    lines += ["", f"Issue target (incr after {args.transactions:,} transactions: at most 0.3x pgBackRest's size, no slower): "
              f"size {z_i['data'] / max(1, pz_i['data']):.3f}x ({'met' if size_ok else 'NOT met'}), "
              f"time {s_i.wall / max(1e-9, p_i.wall):.2f}x ({'met' if time_ok else 'NOT met'}). Single run per step "
              f"(backups cannot be repeated without changing the chain); on a shared 2-core machine times vary by ~20%."]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
