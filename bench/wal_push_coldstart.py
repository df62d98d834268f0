"""Cold start of ``saveit-backup wal-push`` and backlog drain rate, sync vs async.

    .venv/bin/python bench/wal_push_coldstart.py [--runs 20] [--backlog 150] [--pycache DIR]

* cold start: median wall time of ``--runs`` fresh ``.venv/bin/saveit-backup wal-push <segment>``
  processes (16 MiB segments, pseudo-WAL content: half random, half zero pages) into a fresh local
  repository, next to ``python -c pass``;
* backlog: ``--backlog`` segments marked ``.ready`` in a fake pg_wal, pushed one call at a time
  the way PostgreSQL's archiver does (rename ``.ready`` to ``.done`` after each success), with and
  without ``--async``.
``--pycache DIR`` sets PYTHONPYCACHEPREFIX so compiled bytecode is reused (an installed wheel has
it; an editable checkout owned by another user compiles every module at every start).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEG = 16 << 20
CLI = str(Path(sys.executable).parent / "saveit-backup")


def make_segment(directory: Path, segno: int, rng: random.Random) -> Path:
    name = f"00000001{segno // 256:08X}{segno % 256:08X}"
    page_random = rng.randbytes(8192)
    pages = bytearray()
    for i in range(SEG // 8192):
        pages += page_random if i % 2 else bytes(8192)
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, segno * SEG, 0, 7_000_000_000, SEG, 8192)
    pages[: len(header)] = header
    path = directory / name
    path.write_bytes(pages)
    return path


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--backlog", type=int, default=150)
    p.add_argument("--pycache", help="PYTHONPYCACHEPREFIX (reuse compiled bytecode)")
    args = p.parse_args()
    rng = random.Random(1)
    work = Path(tempfile.mkdtemp(prefix="saveit-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUP_")}
    if args.pycache:
        env["PYTHONPYCACHEPREFIX"] = args.pycache
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        segs = work / "segs"
        segs.mkdir()
        env["BACKUP_REPOSITORY"] = f"file://{work / 'repo'}"
        files = [make_segment(segs, 100 + i, rng) for i in range(args.runs + 1)]
        timed([CLI, "wal-push", str(files[0])], env)  # initialises the repository (and warms the page cache)
        base = [timed([sys.executable, "-c", "pass"], env) for _ in range(args.runs)]
        push = [timed([CLI, "wal-push", str(f)], env) for f in files[1:]]
        print(f"python -c pass     median {statistics.median(base) * 1000:6.1f} ms")
        print(f"wal-push (16 MiB)  median {statistics.median(push) * 1000:6.1f} ms  "
              f"(min {min(push) * 1000:.1f}, max {max(push) * 1000:.1f})")

        for mode in ("sync", "async"):
            pg_wal = work / f"pg_wal_{mode}"
            status = pg_wal / "archive_status"
            status.mkdir(parents=True)
            names = []
            for i in range(args.backlog):
                names.append(make_segment(pg_wal, 1000 + i, rng).name)
                (status / f"{names[-1]}.ready").touch()
            menv = dict(env, BACKUP_REPOSITORY=f"file://{work / ('repo_' + mode)}", BACKUP_SPOOL_DIR=str(work / "spool"))
            extra = ["--async"] if mode == "async" else []
            start = time.perf_counter()
            for name in names:
                subprocess.run([CLI, "wal-push", *extra, str(pg_wal / name)], env=menv, check=True)
                (status / f"{name}.ready").rename(status / f"{name}.done")
            elapsed = time.perf_counter() - start
            print(f"backlog {args.backlog} x 16 MiB, {mode:5}: {elapsed:6.1f} s, {args.backlog / elapsed:6.1f} segments/s")
            shutil.rmtree(pg_wal)
        try:
            os.kill(int((work / "spool" / "worker.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
