"""Connections and PostgreSQL client tools, with passwords kept out of argv and messages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saveit_backup.errors import DatabaseUnreachable, PgToolError, PgVersionMismatch

if TYPE_CHECKING:
    import psycopg


def split_password(dsn: str) -> tuple[str, dict[str, str]]:
    """(dsn without password, extra environment carrying it as PGPASSWORD)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if not dsn:
        return "", {}
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = {"PGPASSWORD": str(password)} if password else {}
    return make_conninfo(**{k: str(v) for k, v in params.items()}), env


def with_dbname(dsn: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn) if dsn else {}
    params["dbname"] = dbname
    return make_conninfo(**{k: str(v) for k, v in params.items()})


def describe_dsn(dsn: str) -> str:
    """host:port/dbname for messages; never the password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        p = conninfo_to_dict(dsn) if dsn else {}
    except Exception:
        return "<invalid connection string>"
    host = p.get("host") or os.environ.get("PGHOST", "local socket")
    port = p.get("port") or os.environ.get("PGPORT", "5432")
    db = p.get("dbname") or os.environ.get("PGDATABASE") or p.get("user") or os.environ.get("PGUSER", "")
    return f"{host}:{port}/{db}"


def connect(dsn: str, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection[Any]:
    import psycopg

    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10, application_name="saveit-backup", **kwargs)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"password=\S+", "password=****", first)
        raise DatabaseUnreachable(f"cannot connect to {describe_dsn(dsn)}: {first}") from None


@dataclass(frozen=True)
class ServerFacts:
    version_num: int
    system_identifier: str
    database: str
    data_checksums: bool

    @property
    def major(self) -> int:
        return self.version_num // 10000


def server_facts(conn: psycopg.Connection[Any]) -> ServerFacts:
    row = conn.execute(
        "SELECT current_setting('server_version_num')::int, (SELECT system_identifier::text FROM pg_control_system()),"
        " current_database(), current_setting('data_checksums') = 'on'"
    ).fetchone()
    assert row is not None
    return ServerFacts(int(row[0]), str(row[1]), str(row[2]), bool(row[3]))


def find_tool(name: str, bindir: str = "", server_major: int | None = None, exact: bool = False) -> str:
    """Locate a client tool; refuse one older than the server (pg_dump would refuse later, less clearly).

    ``exact``: only the server's major will do (pg_ctl for a restored data directory)."""
    candidates: list[Path] = []
    if bindir:
        candidates.append(Path(bindir) / name)
    else:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
        candidates += [p / name for p in versions]
        on_path = shutil.which(name)
        if on_path:
            candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            if server_major is not None:
                major = tool_major(str(path))
                if major < server_major or (exact and major != server_major):
                    continue
            return str(path)
    if server_major is not None and candidates:
        where = ", ".join(str(c.parent) for c in candidates)
        if exact:
            raise PgVersionMismatch(f"no {name} of PostgreSQL {server_major} found in {where}",
                                    hint=f"install PostgreSQL {server_major}'s tools or set BACKUP_PG_BINDIR to their directory")
        raise PgVersionMismatch(f"{name} older than the server (PostgreSQL {server_major}) found in {where}")
    raise PgToolError(f"{name} not found", hint="install the PostgreSQL client tools or set BACKUP_PG_BINDIR")


def tool_major(path: str) -> int:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else 0


def tool_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
