"""Reusable benchmark harness: a throwaway cluster, data sets, measured runs and markdown tables.

Benchmarks import it as ``from common import ...`` (they run as ``python bench/NAME.py``)::

    with throwaway_cluster(Path("/var/tmp")) as cluster:
        cluster.psql("CREATE DATABASE bench")
        pgbench_init(cluster, "bench", scale=5)
        add_random_table(cluster, "bench", rows=100_000)
        results = run_rounds([Contender("a", lambda r: ["true"]), Contender("b", lambda r: ["sleep", "0.1"])], rounds=3)
        print(markdown_table(results, peer="a"))

Measurement (``measure``): wall time; CPU seconds (user + system) of the process and every descendant
it reaped, from ``wait4``; peak RSS of the whole process tree (psutil polls the process and its
descendants every 20 ms and sums their RSS) and the largest RSS seen per process name (e.g. the
CLI's Python process apart from the ``pg_dump`` it spawns).  ``run_rounds`` runs every contender once
per round, rotating the order each round so that no contender always runs first (or right after the
same neighbour) on a shared machine, and reports medians over the rounds (peak RSS: the maximum).
PostgreSQL server processes are not descendants of the measured command and are not counted.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from saveit_backup.pg.cluster import Cluster, default_bindir, free_port

CLI = str(Path(sys.executable).parent / "saveit-backup")
POLL_SECONDS = 0.02
MB = 1_000_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def reexec_as_postgres() -> None:
    """PostgreSQL refuses root: started as root, run this script again as the postgres OS user."""
    if os.geteuid() != 0:
        return
    if not shutil.which("runuser"):
        sys.exit("run this benchmark as the postgres OS user (PostgreSQL refuses root)")
    log("started as root: compiling bytecode (as an installed wheel ships it), re-running as the postgres OS user")
    src = Path(__file__).resolve().parent.parent / "src"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=False, capture_output=True)
    subprocess.run(["chmod", "-R", "a+rX", str(src.parent)], check=False)
    os.execvp("runuser", ["runuser", "-u", "postgres", "--", sys.executable, *sys.argv])


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without BACKUP_*/PG*/AWS_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "PG", "AWS_", "DATABASE_URL"))}
    env.update(extra)
    return env


# --- cluster and data ------------------------------------------------------------------
@contextmanager
def throwaway_cluster(workdir: Path, extra_conf: dict[str, str] | None = None, keep: bool = False,
                      bindir: str | None = None) -> Iterator[Cluster]:
    """initdb + start a cluster (``bindir``'s PostgreSQL, default the newest installed) under a fresh directory
    of ``workdir``; stop and delete it afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="saveit-bench-", dir=workdir))
    cluster = Cluster(base / "data", free_port(), bindir or default_bindir(), socket_dir=base)
    try:
        cluster.initdb(checksums=False, extra_conf=extra_conf)
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        if keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def pg_env(cluster: Cluster, dbname: str, **extra: str) -> dict[str, str]:
    return clean_env(PGHOST=cluster.host, PGPORT=str(cluster.port), PGDATABASE=dbname, **extra)


def pgbench_init(cluster: Cluster, dbname: str, scale: int) -> None:
    """``pgbench -i -s scale`` (tables, data, vacuum, primary keys)."""
    subprocess.run([cluster.tool("pgbench"), "-i", "-q", "-s", str(scale), dbname], env=pg_env(cluster, dbname),
                   check=True, capture_output=True)


def add_random_table(cluster: Cluster, dbname: str, rows: int, name: str = "random_values") -> None:
    """A table that compresses poorly: random float8 and 16 random bytes (bytea) per row."""
    cluster.psql(f"CREATE TABLE {name} (id bigint PRIMARY KEY, f double precision NOT NULL, b bytea NOT NULL)", dbname)
    cluster.psql(f"INSERT INTO {name} SELECT g, random(), decode(md5(random()::text || g), 'hex')"
                 f" FROM generate_series(1, {int(rows)}) g", dbname)
    cluster.psql(f"VACUUM ANALYZE {name}", dbname)


def database_size(cluster: Cluster, dbname: str) -> int:
    return int(cluster.psql(f"SELECT pg_database_size('{dbname}')"))


# --- measuring -------------------------------------------------------------------------
@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # user + system seconds of the process and its reaped descendants
    peak_tree_rss: int  # bytes: largest sum of RSS over the process tree at one poll
    peak_rss: dict[str, int]  # bytes: largest RSS of one process, per process name
    returncode: int
    stdout: str
    stderr: str


def _poll_tree(pid: int, stop: threading.Event, sample: Sample) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = p.name()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            total += rss
            sample.peak_rss[name] = max(sample.peak_rss.get(name, 0), rss)
        sample.peak_tree_rss = max(sample.peak_tree_rss, total)
        stop.wait(POLL_SECONDS)


def measure(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Sample:
    """Run ``cmd`` to completion, polling its process tree's memory; stdout/stderr are captured."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd, stdout=out, stderr=err)
        sample = Sample(0.0, 0.0, 0, {}, 0, "", "")
        stop = threading.Event()
        poller = threading.Thread(target=_poll_tree, args=(proc.pid, stop, sample), name="rss-poll", daemon=True)
        poller.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        finally:
            stop.set()
        sample.wall = time.perf_counter() - start
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
        sample.returncode = proc.returncode
        sample.cpu = usage.ru_utime + usage.ru_stime
        sample.peak_tree_rss = max(sample.peak_tree_rss, usage.ru_maxrss * 1024)  # the kernel's high-water mark
        out.seek(0)
        err.seek(0)
        sample.stdout = out.read().decode(errors="replace")
        sample.stderr = err.read().decode(errors="replace")
    return sample


def shell(pipeline: str) -> list[str]:
    """A shell pipeline that fails if any part fails."""
    return ["bash", "-o", "pipefail", "-c", pipeline]


# --- contenders and rounds ---------------------------------------------------------------
@dataclass
class Contender:
    """One command under test.  ``before``/``after`` run untimed around each run (``after`` returns metrics)."""

    name: str
    command: Callable[[int], Sequence[str]]  # round number (-1: warm-up) -> argv
    env: Mapping[str, str] | None = None
    main_process: str | None = None  # process name whose own peak RSS gets a column (e.g. "saveit-backup")
    before: Callable[[int], None] | None = None
    after: Callable[[int, Sample], Mapping[str, float]] | None = None


@dataclass
class Result:
    contender: Contender
    samples: list[Sample] = field(default_factory=list)
    metrics: list[Mapping[str, float]] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    @property
    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    @property
    def peak_tree_rss(self) -> int:
        return max(s.peak_tree_rss for s in self.samples)

    def peak_rss(self, name: str) -> int:
        return max(s.peak_rss.get(name, 0) for s in self.samples)

    def metric(self, key: str) -> float | None:
        values = [m[key] for m in self.metrics if key in m]
        return statistics.median(values) if values else None


class RunFailed(RuntimeError):
    pass


def _run_one(c: Contender, rnd: int) -> tuple[Sample, Mapping[str, float]]:
    if c.before:
        c.before(rnd)
    sample = measure(c.command(rnd), c.env)
    if sample.returncode != 0:
        raise RunFailed(f"{c.name} exited {sample.returncode}: {sample.stderr.strip()[-800:]}")
    extra = c.after(rnd, sample) if c.after else {}
    return sample, extra


def run_rounds(contenders: Sequence[Contender], rounds: int, warmup: bool = True) -> dict[str, Result]:
    """Each round runs every contender once, the order rotated by one per round; one untimed warm-up round first."""
    results = {c.name: Result(c) for c in contenders}
    n = len(contenders)
    if warmup:
        for c in contenders:
            log(f"warm-up: {c.name}")
            _run_one(c, -1)
    for rnd in range(rounds):
        order = [contenders[(rnd + i) % n] for i in range(n)]
        for c in order:
            sample, extra = _run_one(c, rnd)
            results[c.name].samples.append(sample)
            results[c.name].metrics.append(extra)
            log(f"round {rnd + 1}/{rounds}: {c.name}: {sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU, "
                f"peak RSS {sample.peak_tree_rss / MB:.0f} MB"
                + "".join(f", {k} {v:,.0f}" for k, v in extra.items()))
    return results


# --- reporting ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricColumn:
    key: str  # a key returned by Contender.after
    title: str
    scale: float = 1.0
    digits: int = 1
    ratio: bool = True  # add an "x peer" column


def _ratio(value: float | None, peer: float | None) -> str:
    if value is None or not peer:
        return "-"
    return f"{value / peer:.2f}x"


def markdown_table(results: Mapping[str, Result], peer: str, metrics: Sequence[MetricColumn] = ()) -> str:
    """Medians of time and CPU, metric columns, peak RSS; ratios against the ``peer`` contender."""
    p = results[peer]
    head = ["Contender", "Time (s)", f"Time vs {peer}", "CPU (s)"]
    for m in metrics:
        head += [m.title] + ([f"vs {peer}"] if m.ratio else [])
    head += ["Peak RSS, tree (MB)", "Peak RSS, main process (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in results.values():
        row = [re.sub(r"(?<!\\)\|", r"\\|", r.contender.name), f"{r.wall:.2f}", _ratio(r.wall, p.wall), f"{r.cpu:.2f}"]
        for m in metrics:
            v = r.metric(m.key)
            row.append("-" if v is None else f"{v / m.scale:,.{m.digits}f}")
            if m.ratio:
                row.append(_ratio(v, p.metric(m.key)))
        main = r.contender.main_process
        row += [f"{r.peak_tree_rss / MB:.0f}", f"{r.peak_rss(main) / MB:.0f} ({main})" if main else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / (1 << 30)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; load average at start {load}")


def pg_version(cluster: Cluster) -> str:
    return cluster.psql("SHOW server_version")


def command_line() -> str:
    exe = os.path.relpath(sys.executable)
    return " ".join(shlex.quote(a) for a in [sys.executable if exe.startswith("..") else exe, *sys.argv])


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def update_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a markdown file with ``body``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
