"""Logical backup and restore: ``saveit-backup`` against ``pg_dump -Fc``, ``pg_dump | gzip`` and ``pg_restore -j2``.

    chmod -R a+rX .   # as root: the script re-runs itself as the postgres OS user
    .venv/bin/python bench/logical.py [--scale 100] [--rounds 3] [--random-rows 2000000]
                                      [--sweep 3:0,3:1,1:2,6:2] [--out docs/benchmarks.md]

A throwaway cluster gets a pgbench database (``pgbench -i -s SCALE``) plus ``random_values``, a table
of random float8 and bytea values that compresses poorly.  In the same run, interleaved round-robin
(``bench/common.py``):

* backup: ``saveit-backup backup --type logical`` into a local repository with encryption on
  (``BACKUP_ENCRYPTION_PASSPHRASE``), the default zstd settings and each ``--sweep`` variant
  (``LEVEL:THREADS`` -> ``BACKUP_COMPRESSION_LEVEL``/``BACKUP_COMPRESSION_THREADS``); ``pg_dump -Fc``;
  ``pg_dump | gzip -6``.  Size: the manifest's stored bytes, the file sizes.
* restore into a fresh database: ``saveit-backup restore ID --jobs 2`` (the default variant's backup)
  against ``pg_restore -j2`` of the ``pg_dump -Fc`` file.

Medians over ``--rounds`` rounds; ratios against ``pg_dump -Fc`` and ``pg_restore -j2``.  With ``--out``
the section "Logical backup (issue 2)" of that markdown file is replaced.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from common import (
    CLI,
    MB,
    Contender,
    MetricColumn,
    Result,
    Sample,
    add_random_table,
    command_line,
    database_size,
    log,
    machine_description,
    markdown_table,
    pg_env,
    pg_version,
    pgbench_init,
    reexec_as_postgres,
    run_rounds,
    shell,
    throwaway_cluster,
    today,
    update_section,
)

from saveit_backup.pg.cluster import Cluster

SECTION = "Logical backup (issue 2)"
PASSPHRASE = "benchmark passphrase, not a secret"
DB = "bench"
PG_DUMP_FC = "pg_dump -Fc"
PG_DUMP_GZ = "pg_dump | gzip -6"
PG_RESTORE = "pg_restore -j2"
OURS = "saveit-backup"
OURS_RESTORE = "saveit-backup restore --jobs 2"
CANDIDATE = "candidate"
TARGETS = {"backup_time": 0.8, "backup_size": 1.0, "restore_time": 1.0, "rss_mb": 150}


def parse_sweep(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        level, _, threads = item.partition(":")
        out.append((int(level), int(threads or "2")))
    return out


def variant_name(level: int, threads: int) -> str:
    return f"{OURS} (zstd-{level}, {threads} thread{'s' if threads != 1 else ''})"


def ours_backup(cluster: Cluster, work: Path, name: str, knobs: Mapping[str, str], ids: dict[str, list[str]]) -> Contender:
    env = pg_env(cluster, DB, BACKUP_REPOSITORY=f"file://{work / ('repo-' + str(len(ids)))}",
                 BACKUP_ENCRYPTION_PASSPHRASE=PASSPHRASE, BACKUP_PG_BINDIR=cluster.bindir,
                 # compiled bytecode is reused as from an installed wheel (a checkout owned by another user is not)
                 PYTHONPYCACHEPREFIX=str(work / "pycache"), **knobs)
    ids[name] = []

    def after(_rnd: int, sample: Sample) -> dict[str, float]:
        manifest = json.loads(sample.stdout)
        ids[name].append(str(manifest["id"]))
        assert manifest["encryption"] == "aes-256-gcm", manifest["encryption"]
        return {"bytes": float(manifest["stored_bytes"]), "plain": float(manifest["plain_bytes"])}

    return Contender(name, lambda _r: [CLI, "--quiet", "--json", "backup", "--type", "logical"], env, "saveit-backup",
                     after=after)


def file_size(path: Path) -> dict[str, float]:
    return {"bytes": float(path.stat().st_size)}


def backup_contenders(cluster: Cluster, work: Path, sweep: list[tuple[int, int]], ids: dict[str, list[str]],
                      candidate: Path | None) -> list[Contender]:
    pg_dump = cluster.tool("pg_dump")
    fc, gz = work / "pg_dump.dump", work / "pg_dump.sql.gz"
    env = pg_env(cluster, DB)
    out = [
        ours_backup(cluster, work, OURS, {}, ids),
        Contender(PG_DUMP_FC, lambda _r: [pg_dump, "-Fc", "-f", str(fc), DB], env, "pg_dump",
                  after=lambda _r, _s: file_size(fc)),
        Contender(PG_DUMP_GZ, lambda _r: shell(f"{shlex.quote(pg_dump)} {DB} | gzip -6 > {shlex.quote(str(gz))}"), env,
                  "pg_dump", after=lambda _r, _s: file_size(gz)),
    ]
    for level, threads in sweep:
        knobs = {"BACKUP_COMPRESSION_LEVEL": str(level), "BACKUP_COMPRESSION_THREADS": str(threads)}
        out.append(ours_backup(cluster, work, variant_name(level, threads), knobs, ids))
    if candidate:
        out.append(ours_backup(cluster, work, CANDIDATE, {"PYTHONPATH": str(candidate)}, ids))
    return out


def restore_contenders(cluster: Cluster, work: Path, backups: Mapping[str, tuple[str, Mapping[str, str]]]) -> list[Contender]:
    """``backups``: contender name -> (backup ID, environment of its repository)."""
    counter = iter(range(1_000_000))
    targets: dict[str, str] = {}

    def fresh(name: str) -> None:
        db = f"restore_{next(counter)}"
        cluster.psql(f"CREATE DATABASE {db}")
        targets[name] = db

    def drop(name: str) -> dict[str, float]:
        cluster.psql(f"DROP DATABASE {targets.pop(name)}")
        return {}

    def ours(name: str, backup_id: str, env: Mapping[str, str]) -> Contender:
        return Contender(name, lambda _r: [CLI, "--quiet", "restore", backup_id, "--target-db", cluster.dsn(targets[name]),
                                           "--jobs", "2"],
                         env, "saveit-backup", before=lambda _r: fresh(name), after=lambda _r, _s: drop(name))

    fc = work / "pg_dump.dump"
    return [
        *(ours(name, backup_id, env) for name, (backup_id, env) in backups.items()),
        Contender(PG_RESTORE, lambda _r: [cluster.tool("pg_restore"), "-j2", "-d", targets[PG_RESTORE], str(fc)],
                  pg_env(cluster, DB), "pg_restore", before=lambda _r: fresh(PG_RESTORE),
                  after=lambda _r, _s: drop(PG_RESTORE)),
    ]


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def conclusions(backup: Mapping[str, Result], restore: Mapping[str, Result] | None) -> list[str]:
    ours, fc = backup[OURS], backup[PG_DUMP_FC]
    t = ours.wall / fc.wall
    size_ours, size_fc = ours.metric("bytes") or 0.0, fc.metric("bytes") or 1.0
    s = size_ours / size_fc
    rss = ours.peak_rss("saveit-backup") / MB
    lines = [
        f"- Backup time {t:.2f}x `pg_dump -Fc` (target at most {TARGETS['backup_time']}x): {verdict(t <= TARGETS['backup_time'])}.",
        f"- Backup size {s:.2f}x `pg_dump -Fc` ({size_ours / MB:.1f} MB vs {size_fc / MB:.1f} MB; target no larger), "
        f"encrypted: {verdict(s <= TARGETS['backup_size'])}.",
    ]
    if restore:
        r = restore[OURS_RESTORE].wall / restore[PG_RESTORE].wall
        rss = max(rss, restore[OURS_RESTORE].peak_rss("saveit-backup") / MB)
        lines.append(f"- Restore time {r:.2f}x `pg_restore -j2` (target at most 1x): {verdict(r <= TARGETS['restore_time'])}.")
    lines.append(f"- Peak RSS of the saveit-backup process {rss:.0f} MB (target under {TARGETS['rss_mb']} MB): "
                 f"{verdict(rss < TARGETS['rss_mb'])}.")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=100, help="pgbench scale (default 100)")
    p.add_argument("--random-rows", type=int, default=2_000_000, help="rows of the random_values table")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (medians; default 3)")
    p.add_argument("--sweep", default="", help="extra saveit-backup variants LEVEL:THREADS,... (e.g. 3:0,3:1,1:2,6:2)")
    p.add_argument("--no-restore", action="store_true", help="backup only")
    p.add_argument("--candidate-src", type=Path,
                   help="also run saveit-backup with PYTHONPATH=DIR (a patched copy of src/) as contender 'candidate'")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where the cluster and outputs go")
    p.add_argument("--out", type=Path, help="markdown file whose section 'Logical backup (issue 2)' is replaced")
    p.add_argument("--notes", default="", help="extra markdown appended to the section's notes")
    p.add_argument("--keep", action="store_true", help="keep the cluster directory")
    args = p.parse_args()
    reexec_as_postgres()
    out_path = args.out.resolve() if args.out else None

    with throwaway_cluster(args.workdir, keep=args.keep) as cluster:
        work = Path(cluster.host) / "out"
        work.mkdir()
        log(f"cluster on port {cluster.port} in {cluster.host}; pgbench -i -s {args.scale}")
        cluster.psql(f"CREATE DATABASE {DB}")
        pgbench_init(cluster, DB, args.scale)
        log(f"random_values: {args.random_rows} rows")
        add_random_table(cluster, DB, args.random_rows)
        size = database_size(cluster, DB)
        log(f"database size {size / MB:.0f} MB")

        ids: dict[str, list[str]] = {}
        candidate = args.candidate_src.resolve() if args.candidate_src else None
        backup = run_rounds(backup_contenders(cluster, work, parse_sweep(args.sweep), ids, candidate), args.rounds)
        print(markdown_table(backup, PG_DUMP_FC, [MetricColumn("bytes", "Size (MB)", MB)]))
        restore = None
        if not args.no_restore:
            backups = {OURS_RESTORE: (ids[OURS][-1], backup[OURS].contender.env or {})}
            if candidate:
                backups[f"{CANDIDATE} restore --jobs 2"] = (ids[CANDIDATE][-1], backup[CANDIDATE].contender.env or {})
            restore = run_rounds(restore_contenders(cluster, work, backups), args.rounds)
            print(markdown_table(restore, PG_RESTORE))
        verdicts = conclusions(backup, restore)
        print("\n".join(verdicts))

        if out_path:
            plain = backup[OURS].metric("plain") or 0
            body = [
                f"Measured {today()} on {machine_description()}; PostgreSQL {pg_version(cluster)}.",
                "",
                "```bash",
                f"chmod -R a+rX . && runuser -u postgres -- {command_line()}",
                "```",
                "",
                f"Data: `pgbench -i -s {args.scale}` plus `random_values` ({args.random_rows:,} rows of random float8 and "
                f"16 random bytes), {size / MB:,.0f} MB on disk, {plain / MB:,.0f} MB as an uncompressed custom-format "
                f"dump. Medians of {args.rounds} rounds after one warm-up round; contenders interleaved round-robin "
                f"(order rotated each round). saveit-backup writes to a local `file://` repository with encryption "
                f"on (passphrase, AES-256-GCM). CPU is user + system time of the command and every process it "
                f"waited for (`pg_dump`, `gzip`, `pg_restore` workers); peak RSS is the largest sum over the process tree "
                f"(psutil, 20 ms polls) and the largest RSS of the named process. Size is the stored bytes "
                f"(manifest `stored_bytes`) or the file size.",
                "",
                "### Backup",
                "",
                markdown_table(backup, PG_DUMP_FC, [MetricColumn("bytes", "Size (MB)", MB)]),
                "",
            ]
            if restore:
                body += [
                    "### Restore into a fresh database",
                    "",
                    markdown_table(restore, PG_RESTORE),
                    "",
                    "saveit-backup restore --jobs 2: the schema from the archive's table of contents, then each table's "
                    "COPY text cut from the archive as it is decrypted and decompressed, loaded over two connections "
                    "(each block to the first one free), a table's own keys built as soon as its rows are in, the "
                    "rest of the post-data with `pg_restore -j2`; row counts from COPY, compared with the manifest.",
                    "",
                ]
            body += ["### Against the targets of issue 2 item 13", "", *verdicts]
            if args.notes:
                body += ["", args.notes]
            try:
                update_section(out_path, SECTION, "\n".join(body))
            except PermissionError:  # run as postgres in a tree owned by someone else: leave a copy to merge
                fallback = args.workdir / out_path.name
                if out_path.exists():
                    shutil.copyfile(out_path, fallback)
                update_section(fallback, SECTION, "\n".join(body))
                log(f"cannot write {out_path}: wrote {fallback} instead")
                out_path = fallback
            log(f"wrote section '{SECTION}' of {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
