"""Physical backups and WAL archiving (issue 3): saveit-backup against pgBackRest 2.45, pg_basebackup and tar | zstd.

    chmod -R a+rX .   # as root: the script re-runs itself as the postgres OS user
    .venv/bin/python bench/physical.py [--scale 100] [--rounds 3] [--random-rows N] [--backlog 200]
                                       [--coldstart-runs 20] [--out FILE] [--skip-backup] [--skip-wal]

One throwaway cluster (data checksums on, ``archive_mode = on``) holds a pgbench database
(``pgbench -i -s SCALE``) plus ``random_values`` (random float8 and bytea, compresses poorly).  Its
``archive_command`` is a script that pushes every segment, in parallel, into pgBackRest's stanza and
into both saveit repositories (plain and encrypted), so that every tool's backup finds its WAL.
In the same run, interleaved round-robin (``bench/common.py``), medians over ``--rounds`` rounds:

* full backup: saveit-backup local mode (``--pgdata``; page checksums verified, and
  ``--no-verify-checksums``), remote mode (``--remote``: pg_basebackup with server-side zstd), lz4,
  and encrypted (information only); ``pgbackrest backup --type=full`` (process-max=2, zst level 3
  and lz4); ``pg_basebackup -Ft -X fetch --compress=server-zstd:level=3,workers=2`` and server-lz4
  (-X fetch, as our remote mode: with -X none the server waits about 1 s for its archiver);
  the physical limit ``tar | zstd -T2 -3`` (and ``tar | lz4``) of the same files (pg_wal excluded).
  Size: saveit's stored bytes without the copied WAL objects, pgBackRest's repository size of
  the set (WAL lives in the archive), file sizes for pg_basebackup and tar.
* restore into an empty directory (no server start): saveit-backup ``restore ID --target-dir``,
  ``pgbackrest restore`` (process-max=2), ``zstd -d | tar -x``.
* WAL push throughput: 200 real segments of the cluster (made while ``archive_command = 'false'``),
  hard-linked into a staging ``pg_wal`` with ``archive_status/*.ready``; a driver calls each tool
  once per segment in name order and renames ``.ready`` to ``.done`` after each success, as
  PostgreSQL's archiver does: ``saveit-backup wal-push`` and ``pgbackrest archive-push``, sync and
  async (``wal-push --async``; ``archive-push --archive-async --process-max=2``, spool path), and
  ``saveit-wal-push --async``, the native async client that answers without starting Python; and
  both sync pushes encrypted (pgBackRest ``aes-256-cbc``, saveit a passphrase). saveit's settings
  are in a TOML file (``BACKUP_CONFIG``, plus ``BACKUP_SPOOL_DIR`` for async), as the README's
  ``archive_command`` has them and as pgBackRest reads its config file.
  The driver is a child subreaper, so detached async workers stay in the measured process tree.
* cold start: ``--coldstart-runs`` single pushes of one segment for each tool, alternating.

Started as root, the harness compiles the package's bytecode first, as an installed wheel would
have it (the checkout belongs to root; postgres cannot write ``__pycache__``; a PYTHONPYCACHEPREFIX
would also recompile the standard library and slow every start-up).
Server processes (server-side compression) are not counted in CPU or RSS.
The markdown goes to ``--out`` (default /var/tmp/saveit-bench-physical.md; the checkout is not
writable by postgres); ``--docs FILE`` replaces the section in that file instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common import (
    CLI,
    MB,
    Contender,
    MetricColumn,
    Result,
    Sample,
    add_random_table,
    clean_env,
    command_line,
    log,
    machine_description,
    markdown_table,
    measure,
    pg_version,
    pgbench_init,
    reexec_as_postgres,
    run_rounds,
    shell,
    today,
    update_section,
)

from saveit_backup.pg.cluster import Cluster, free_port

SECTION = "Physical backups and WAL archiving (issue 3)"
PASSPHRASE = "benchmark passphrase, not a secret"
DB = "bench"
STANZA = "bench"
PGBACKREST = shutil.which("pgbackrest") or "/usr/bin/pgbackrest"
SEG = 16 << 20

# The driver of the WAL push runs: PostgreSQL's archiver loop, as a child subreaper (detached async
# workers re-parent to it and stay in the measured tree).  It prints the seconds of the loop.
DRIVER = r"""
import ctypes, os, subprocess, sys, time, signal
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
pg_wal, cmd = sys.argv[1], sys.argv[2:]
status = os.path.join(pg_wal, "archive_status")
names = sorted(n[:-6] for n in os.listdir(status) if n.endswith(".ready"))
start = time.perf_counter()
for n in names:
    subprocess.run([*cmd, os.path.join(pg_wal, n)], check=True, stdout=subprocess.DEVNULL)
    os.rename(os.path.join(status, n + ".ready"), os.path.join(status, n + ".done"))
print(time.perf_counter() - start)
sys.stdout.flush()
time.sleep(0.1)
import psutil
kids = psutil.Process().children(recursive=True)
for k in kids:
    try:
        k.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(kids, timeout=10)
for k in kids:
    try:
        k.kill()
    except psutil.NoSuchProcess:
        pass
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Bench:
    def __init__(self, base: Path, cluster: Cluster, pycache: Path) -> None:
        self.base = base
        self.cluster = cluster
        self.pycache = pycache
        self.pgbr_conf = base / "pgbackrest.conf"
        self.repo_plain = base / "repo_plain"
        self.repo_enc = base / "repo_enc"
        self.backup_ids: dict[str, str] = {}
        self.data_bytes = 0

    # --- environments -------------------------------------------------------------------
    def saveit_env(self, repo: Path, codec: str = "zstd", encrypted: bool = False, **extra: str) -> dict[str, str]:
        env = clean_env(BACKUP_REPOSITORY=f"file://{repo}", BACKUP_COMPRESSION=codec, BACKUP_JOBS="2",
                        PGHOST=self.cluster.host, PGPORT=str(self.cluster.port), PGDATABASE="postgres",
                        BACKUP_PG_BINDIR=self.cluster.bindir, **extra)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if codec == "zstd":
            env["BACKUP_COMPRESSION_LEVEL"] = "3"
        if encrypted:
            env["BACKUP_ENCRYPTION_PASSPHRASE"] = PASSPHRASE
        return env

    def saveit_push_env(self, name: str, repo: Path, encrypted: bool = False, spool: Path | None = None) -> dict[str, str]:
        """The environment of a WAL push as the README's archive_command has it: the settings in a TOML file
        (``BACKUP_CONFIG``, as pgBackRest reads its own config file), ``BACKUP_SPOOL_DIR`` for async."""
        lines = [f'repository = "file://{repo}"', 'compression = "zstd"', "compression_level = 3", "jobs = 2",
                 f'key_cache_dir = "{repo.parent / "keys"}"']
        if encrypted:
            lines.append(f'encryption_passphrase = "{PASSPHRASE}"')
        config = self.base / f"push-{name}.toml"
        config.write_text("\n".join(lines) + "\n")
        env = clean_env(BACKUP_CONFIG=str(config), **({"BACKUP_SPOOL_DIR": str(spool)} if spool else {}))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def pgbr(self, *args: str, conf: Path | None = None) -> list[str]:
        return [PGBACKREST, f"--config={conf or self.pgbr_conf}", f"--stanza={STANZA}", *args]

    def write_pgbr_conf(self, path: Path, repo: Path, spool: Path | None = None, pgdata: Path | None = None,
                        encrypted: bool = False) -> None:
        c = self.cluster
        lines = ["[global]", f"repo1-path={repo}", "process-max=2", "compress-type=zst", "compress-level=3", "start-fast=y",
                 "log-level-console=warn", "log-level-file=off", f"lock-path={self.base / 'pgbr-lock'}",
                 f"log-path={self.base / 'pgbr-log'}", "repo1-retention-full=100"]
        if encrypted:
            lines += ["repo1-cipher-type=aes-256-cbc", f"repo1-cipher-pass={PASSPHRASE}"]
        if spool:
            lines.append(f"spool-path={spool}")
        lines += [f"[{STANZA}]", f"pg1-path={pgdata or c.datadir}", f"pg1-socket-path={c.host}", f"pg1-port={c.port}",
                  f"pg1-user={os.environ.get('USER', 'postgres')}"]
        path.write_text("\n".join(lines) + "\n")

    # --- set-up -----------------------------------------------------------------------------
    def setup_archiving(self) -> None:
        self.write_pgbr_conf(self.pgbr_conf, self.base / "pgbr_repo")
        subprocess.run(self.pgbr("stanza-create"), check=True, capture_output=True)
        (self.base / "plain.toml").write_text(f'repository = "file://{self.repo_plain}"\njobs = 2\n')
        (self.base / "enc.toml").write_text(f'repository = "file://{self.repo_enc}"\nencryption_passphrase = "{PASSPHRASE}"\n')
        script = self.base / "archive-pgbackrest-saveit.sh"  # pgBackRest insists on "pgbackrest" in it
        pyc = ""  # bytecode is compiled up front (reexec_as_postgres); a cache prefix would recompile the stdlib too
        script.write_text(
            "#!/bin/bash\nunset PYTHONDONTWRITEBYTECODE\n"
            f"{' '.join(self.pgbr('archive-push'))} \"$1\" & a=$!\n"
            f"{pyc} BACKUP_CONFIG={self.base / 'plain.toml'} {CLI} wal-push \"$1\" & b=$!\n"
            f"{pyc} BACKUP_CONFIG={self.base / 'enc.toml'} {CLI} wal-push \"$1\" & c=$!\n"
            "wait $a && wait $b && wait $c\n")
        script.chmod(0o755)
        self.set_archive_command(str(script) + " %p")
        log("archiving into pgBackRest's stanza and both saveit repositories")

    def set_archive_command(self, command: str) -> None:
        self.cluster.psql(f"ALTER SYSTEM SET archive_command = '{command}'")
        self.cluster.psql("SELECT pg_reload_conf()")
        time.sleep(0.5)

    def ready_segments(self) -> list[str]:
        status = self.cluster.datadir / "pg_wal" / "archive_status"
        return sorted(n[:-6] for n in os.listdir(status) if n.endswith(".ready") and len(n) == 30)

    def collect_segments(self, backlog: int) -> Path:
        """``backlog`` real segments of this cluster (kept as .ready while archive_command fails)."""
        c = self.cluster
        c.psql("CREATE TABLE IF NOT EXISTS walgen (id bigint, t text)", DB)
        while len(self.ready_segments()) < backlog:
            c.psql("INSERT INTO walgen SELECT g, md5(random()::text) || repeat(md5(g::text), 3) FROM generate_series(1, 60000) g;"
                   " SELECT pg_switch_wal()", DB)
        store = self.base / "segments"
        store.mkdir()
        for name in self.ready_segments()[:backlog]:
            shutil.copyfile(c.datadir / "pg_wal" / name, store / name)
        c.psql("DROP TABLE walgen", DB)
        log(f"kept {backlog} real segments for the WAL push runs")
        # Let the archiver forget the backlog ('true' marks them done), then archive for real.
        self.set_archive_command("true")
        deadline = time.monotonic() + 600
        while self.ready_segments() and time.monotonic() < deadline:
            time.sleep(0.5)
        return store

    # --- backups ------------------------------------------------------------------------------
    def saveit_backup(self, name: str, repo: Path, args: Sequence[str], codec: str = "zstd", encrypted: bool = False,
                      **extra_env: str) -> Contender:
        def after(rnd: int, s: Sample) -> Mapping[str, float]:
            out = json.loads(s.stdout)
            self.backup_ids[name] = out["id"]
            data = sum(o["stored_size"] for o in out["objects"] if not o["name"].startswith("wal/"))
            return {"size": data, "total": out["stored_bytes"]}

        return Contender(name, lambda r: [CLI, "--json", "backup", "--type", "full", *args],
                         self.saveit_env(repo, codec, encrypted, **extra_env), "saveit-backup", after=after)

    def pgbr_backup(self, name: str, extra: Sequence[str]) -> Contender:
        def after(rnd: int, s: Sample) -> Mapping[str, float]:
            info = json.loads(subprocess.run(self.pgbr("info", "--output=json"), check=True, capture_output=True, text=True).stdout)
            newest = info[0]["backup"][-1]
            self.backup_ids[name] = newest["label"]
            return {"size": newest["info"]["repository"]["delta"], "total": newest["info"]["repository"]["delta"]}

        return Contender(name, lambda r: self.pgbr("backup", "--type=full", *extra), clean_env(), "pgbackrest", after=after)

    def file_backup(self, name: str, out: Path, command: list[str]) -> Contender:
        def before(rnd: int) -> None:
            rm(out) if out.is_dir() else out.unlink(missing_ok=True)
            out.parent.mkdir(parents=True, exist_ok=True)  # whichever file contender runs first (see --contenders)

        def after(rnd: int, s: Sample) -> Mapping[str, float]:
            size = du(out)
            return {"size": size, "total": size}

        return Contender(name, lambda r: command, clean_env(), None, before=before, after=after)

    def backup_contenders(self) -> list[Contender]:
        c = self.cluster
        d = str(c.datadir)
        bb = [c.tool("pg_basebackup"), "-h", c.host, "-p", str(c.port), "-Ft", "-X", "fetch", "--checkpoint=fast"]
        tar = f"{{ tar -cf - -C {d} --exclude='./pg_wal/*' --exclude=./postmaster.pid . || [ $? -eq 1 ]; }}"
        out = self.base / "out"
        return [
            self.saveit_backup("saveit local zstd-3", self.repo_plain, ["--pgdata", d]),
            self.saveit_backup("saveit local zstd-3 no-verify", self.repo_plain, ["--pgdata", d, "--no-verify-checksums"]),
            self.saveit_backup("saveit remote zstd-3", self.repo_plain, ["--remote"]),
            self.saveit_backup("saveit local lz4", self.repo_plain, ["--pgdata", d], codec="lz4"),
            self.saveit_backup("saveit local zstd-3 encrypted", self.repo_enc, ["--pgdata", d], encrypted=True),
            self.pgbr_backup("pgBackRest zstd-3", []),
            self.pgbr_backup("pgBackRest lz4", ["--compress-type=lz4", "--compress-level=1"]),
            self.file_backup("pg_basebackup server-zstd-3 workers=2", out / "bb_zstd",
                             [*bb, "-D", str(out / "bb_zstd"), "--compress=server-zstd:level=3,workers=2"]),
            self.file_backup("pg_basebackup server-lz4", out / "bb_lz4", [*bb, "-D", str(out / "bb_lz4"), "--compress=server-lz4"]),
            self.file_backup("tar \\| zstd -T2 -3 (limit)", out / "data.tar.zst",
                             shell(f"{tar} | zstd -q -T2 -3 -f -o {out}/data.tar.zst")),
            self.file_backup("tar \\| lz4 -1 (limit)", out / "data.tar.lz4", shell(f"{tar} | lz4 -q -1 -f - {out}/data.tar.lz4")),
        ]

    # --- restores -------------------------------------------------------------------------------
    def restore_contender(self, name: str, target: Path, command: Callable[[], list[str]], env: dict[str, str],
                          main: str | None) -> Contender:
        def before(rnd: int) -> None:
            rm(target)
            target.mkdir(mode=0o700)
            os.sync()  # nobody inherits the previous contender's dirty pages

        def after(rnd: int, s: Sample) -> Mapping[str, float]:
            started = time.monotonic()
            os.sync()  # what the restore left unwritten (pgBackRest syncs each file; saveit and tar leave it to the kernel)
            synced = time.monotonic() - started
            size = du(target)
            rm(target)
            return {"restored": size, "sync_s": synced}

        return Contender(name, lambda r: command(), env, main, before=before, after=after)

    def restore_contenders(self) -> list[Contender]:
        t = self.base / "restore"
        ids = self.backup_ids
        out = self.base / "out"

        def ours(backup: str) -> Callable[[], list[str]]:
            return lambda: [CLI, "restore", ids[backup], "--target-dir", str(t), "--force", "--immediate"]

        def pgbr(backup: str) -> Callable[[], list[str]]:
            return lambda: self.pgbr("restore", f"--set={ids[backup]}", f"--pg1-path={t}", "--type=immediate")

        return [
            self.restore_contender("saveit restore (local zstd-3)", t, ours("saveit local zstd-3"),
                                   self.saveit_env(self.repo_plain), "saveit-backup"),
            self.restore_contender("saveit restore (remote zstd-3)", t, ours("saveit remote zstd-3"),
                                   self.saveit_env(self.repo_plain), "saveit-backup"),
            self.restore_contender("saveit restore (local lz4)", t, ours("saveit local lz4"),
                                   self.saveit_env(self.repo_plain, "lz4"), "saveit-backup"),
            self.restore_contender("saveit restore (encrypted)", t, ours("saveit local zstd-3 encrypted"),
                                   self.saveit_env(self.repo_enc, encrypted=True), "saveit-backup"),
            self.restore_contender("pgBackRest restore (zstd-3)", t, pgbr("pgBackRest zstd-3"), clean_env(), "pgbackrest"),
            self.restore_contender("pgBackRest restore (lz4)", t, pgbr("pgBackRest lz4"), clean_env(), "pgbackrest"),
            self.restore_contender("zstd -d \\| tar -x (limit)", t,
                                   lambda: shell(f"zstd -q -d -c {out}/data.tar.zst | tar -xf - -C {t}"), clean_env(), None),
        ]

    # --- WAL push --------------------------------------------------------------------------------
    def wal_contender(self, name: str, segments: Path, tool: str, mode: str, encrypted: bool = False) -> Contender:
        """``encrypted``: pgBackRest's repo1-cipher-type=aes-256-cbc, saveit's passphrase (a fresh repository, so
        a fresh salt, every round: the first push of each round derives the key, the next ones read it from
        the key cache)."""
        work = self.base / "walpush"
        staging = work / "pgdata"  # pgBackRest's async push wants pg1-path/pg_wal and pg1-path/global/pg_control
        pg_wal = staging / "pg_wal"

        def before(rnd: int) -> None:
            rm(work)
            (pg_wal / "archive_status").mkdir(parents=True)
            (staging / "global").mkdir()
            shutil.copyfile(self.cluster.datadir / "global" / "pg_control", staging / "global" / "pg_control")
            for seg in sorted(os.listdir(segments)):
                os.link(segments / seg, pg_wal / seg)
                (pg_wal / "archive_status" / f"{seg}.ready").touch()
            if tool == "pgbr":
                conf = work / "pgbackrest.conf"
                self.write_pgbr_conf(conf, work / "repo", work / "spool", pgdata=staging, encrypted=encrypted)
                subprocess.run(self.pgbr("stanza-create", f"--pg1-path={self.cluster.datadir}", conf=conf), check=True, capture_output=True)

        def after(rnd: int, s: Sample) -> Mapping[str, float]:
            loop = float(s.stdout.strip().splitlines()[-1])
            count = len(os.listdir(segments))
            stored = du(work / "repo")
            rm(work)
            return {"seg_s": count / loop, "loop": loop, "stored": stored}

        tag = f"{mode}{'-enc' if encrypted else ''}"
        if tool == "saveit" and mode == "native":  # the native async client (setup.py builds it next to CLI)
            cmd = [str(Path(CLI).parent / "saveit-wal-push"), "--async"]
            env = self.saveit_push_env(tag, work / "repo", spool=work / "spool")
            main = "saveit-wal-push"
        elif tool == "saveit":
            cmd = [CLI, "wal-push", *(["--async"] if mode == "async" else [])]
            env = self.saveit_push_env(tag, work / "repo", encrypted, spool=work / "spool" if mode == "async" else None)
            main = "saveit-backup"
        else:
            cmd = self.pgbr("archive-push", *(["--archive-async"] if mode == "async" else []), conf=work / "pgbackrest.conf")
            env = clean_env()
            main = "pgbackrest"
        return Contender(name, lambda r: [sys.executable, "-c", DRIVER, str(pg_wal), *cmd], env, main, before=before, after=after)

    def coldstart(self, segments: Path, runs: int) -> dict[str, Result]:
        """Single pushes of one segment into a fresh archive, alternating the tools."""
        work = self.base / "cold"
        rm(work)
        work.mkdir()
        conf = work / "pgbackrest.conf"
        self.write_pgbr_conf(conf, work / "pgbr_repo")
        subprocess.run(self.pgbr("stanza-create", conf=conf), check=True, capture_output=True)
        names = sorted(os.listdir(segments))[: runs + 1]
        ours = Contender("saveit-backup wal-push", lambda r: [], self.saveit_push_env("cold", work / "repo"), "saveit-backup")
        theirs = Contender("pgbackrest archive-push", lambda r: [], clean_env(), "pgbackrest")
        results = {c.name: Result(c) for c in (theirs, ours)}
        for i, seg in enumerate(names):
            for c, cmd in ((ours, [CLI, "wal-push"]), (theirs, self.pgbr("archive-push", conf=conf))):
                s = measure([*cmd, str(segments / seg)], c.env)
                if s.returncode != 0:
                    raise RuntimeError(f"{c.name}: {s.stderr[-500:]}")
                if i:  # the first push initialises the archive: not counted
                    results[c.name].samples.append(s)
        rm(work)
        return results


def load_line() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--random-rows", type=int, help="rows of random_values (default scale * 20,000)")
    p.add_argument("--backlog", type=int, default=200)
    p.add_argument("--coldstart-runs", type=int, default=20)
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--out", default="/var/tmp/saveit-bench-physical.md", help="write the markdown section here")
    p.add_argument("--docs", help="replace the section in this markdown file instead")
    p.add_argument("--skip-backup", action="store_true")
    p.add_argument("--skip-wal", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--only-zstd", action="store_true", help="skip the lz4 and encrypted rows (shorter run)")
    p.add_argument("--wal-rounds", type=int, help="rounds of the WAL push runs (default --rounds)")
    p.add_argument("--no-warmup", action="store_true", help="no untimed warm-up round for backups and restores")
    p.add_argument("--contenders", help="regular expression: run only the backup/restore contenders whose name matches "
                                        "(pgBackRest's zstd-3 row, the reference, always runs)")
    args = p.parse_args()
    reexec_as_postgres()
    machine = machine_description()
    base = Path(tempfile.mkdtemp(prefix="saveit-bench-phys-", dir=args.workdir))
    pycache = base / "pycache"
    cluster = Cluster(base / "data", free_port(), socket_dir=base)
    sections: list[str] = []
    loads: list[str] = [f"start {load_line()}"]
    try:
        cluster.initdb(checksums=True, extra_conf={"archive_mode": "on", "archive_command": "'false'", "checkpoint_timeout": "'30min'",
                                                   "max_wal_size": "'4GB'", "wal_keep_size": "0"})
        cluster.start()
        cluster.psql(f"CREATE DATABASE {DB}")
        t0 = time.monotonic()
        pgbench_init(cluster, DB, args.scale)
        add_random_table(cluster, DB, args.random_rows or args.scale * 20_000)
        cluster.psql("CHECKPOINT")
        log(f"pgbench scale {args.scale} + random_values in {time.monotonic() - t0:.0f} s")
        b = Bench(base, cluster, pycache)
        segments = b.collect_segments(args.backlog)
        b.setup_archiving()
        cluster.psql("SELECT pg_switch_wal()")
        scan = subprocess.run(["du", "-sb", "--exclude=pg_wal", str(cluster.datadir)], capture_output=True, text=True, check=True)
        b.data_bytes = int(scan.stdout.split()[0])
        checksums = cluster.psql("SHOW data_checksums")
        header = (f"{today()}; {machine}. PostgreSQL {pg_version(cluster)} (data checksums {checksums}), pgBackRest "
                  f"{subprocess.run([PGBACKREST, 'version'], capture_output=True, text=True).stdout.split()[-1]}; "
                  f"pgbench scale {args.scale} + random_values: data directory without pg_wal {b.data_bytes / MB:,.0f} MB. "
                  f"Medians of {args.rounds} interleaved rounds for backups and restores"
                  f"{'' if args.no_warmup else ' (after a warm-up round)'}, {args.wal_rounds or args.rounds} for the WAL push runs. "
                  f"Command: `{command_line()}`.")
        size = MetricColumn("size", "Size (MB)", MB, 0)

        if not args.skip_backup:
            extra = ("lz4", "encrypted")

            def keep(name: str) -> bool:
                if (name.startswith("pgBackRest") and "zstd-3" in name) or name == "pgBackRest restore (zstd-3)":
                    return True
                if args.only_zstd and any(x in name for x in extra):
                    return False
                return not args.contenders or re.search(args.contenders, name) is not None
            bcs = [c for c in b.backup_contenders() if keep(c.name)]
            backups = run_rounds(bcs, args.rounds, warmup=not args.no_warmup)
            loads.append(f"after backups {load_line()}")
            rcs = [c for c in b.restore_contenders() if keep(c.name)]
            restores = run_rounds(rcs, args.rounds, warmup=not args.no_warmup)
            loads.append(f"after restores {load_line()}")
            sections.append("### Full backup\n\n" + markdown_table(backups, "pgBackRest zstd-3", [size]))
            sections.append("### Restore (files only, no server start)\n\n"
                            + markdown_table(restores, "pgBackRest restore (zstd-3)",
                                             [MetricColumn("sync_s", "sync after (s)", 1, 2, ratio=False)])
                            + "\n\n`sync after`: an untimed `sync` right after each restore (the data directory "
                              "had none before it); pgBackRest fsyncs every file it restores, saveit-backup and tar leave "
                              "the writing to the kernel and PostgreSQL's start-up sync of the data directory.")
        if not args.skip_wal:
            wal = run_rounds([b.wal_contender("pgbackrest archive-push sync", segments, "pgbr", "sync"),
                              b.wal_contender("pgbackrest archive-push --archive-async", segments, "pgbr", "async"),
                              b.wal_contender("saveit wal-push sync", segments, "saveit", "sync"),
                              b.wal_contender("saveit wal-push --async", segments, "saveit", "async"),
                              b.wal_contender("saveit-wal-push --async (native client)", segments, "saveit", "native"),
                              b.wal_contender("pgbackrest archive-push sync, aes-256-cbc", segments, "pgbr", "sync", encrypted=True),
                              b.wal_contender("saveit wal-push sync, aes-256-gcm", segments, "saveit", "sync", encrypted=True)],
                             args.wal_rounds or args.rounds,
                             warmup=False)  # 200 segments per run: the first round warms the page cache for all
            loads.append(f"after WAL push {load_line()}")
            seg_s = MetricColumn("seg_s", "Segments/s", 1, 1)
            loop = MetricColumn("loop", "Drain (s)", 1, 2, ratio=False)
            stored = MetricColumn("stored", "Archive (MB)", MB, 0)
            wtable = markdown_table(wal, "pgbackrest archive-push sync", [seg_s, loop, stored])
            cold = b.coldstart(segments, args.coldstart_runs)
            loads.append(f"after cold start {load_line()}")
            lines = ["| Tool | Median (ms) | Min (ms) | Max (ms) | Peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
            for r in cold.values():
                walls = [s.wall * 1000 for s in r.samples]
                lines.append(f"| {r.contender.name} | {statistics.median(walls):.0f} | {min(walls):.0f} | {max(walls):.0f} | "
                             f"{r.peak_tree_rss / MB:.0f} |")
            sections.append(f"### WAL push: backlog of {args.backlog} segments (16 MiB)\n\n" + wtable
                            + "\n\nTime/CPU/RSS columns cover the whole driver run (its Python driver adds about 10 MB RSS);"
                              " segments/s = segments / the driver's loop time.")
            sections.append(f"### wal-push cold start ({args.coldstart_runs} single pushes each, alternating)\n\n" + "\n".join(lines))
        body = header + "\n\nLoad average (1, 5, 15 min): " + "; ".join(loads) + ".\n\n" + "\n\n".join(sections)
        if args.docs:
            update_section(Path(args.docs), SECTION, body)
            log(f"section '{SECTION}' written to {args.docs}")
        else:
            Path(args.out).write_text(f"## {SECTION}\n\n{body}\n")
            log(f"written to {args.out}")
        print(body)
    finally:
        cluster.stop("immediate")
        for d in base.glob("walpush/spool"):
            pid = d / "worker.pid"
            if pid.exists():
                try:
                    os.kill(int(pid.read_text()), signal.SIGTERM)
                except (OSError, ValueError):
                    pass
        if args.keep:
            log(f"kept {base}")
        else:
            rm(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
