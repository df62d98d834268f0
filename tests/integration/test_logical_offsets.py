"""Data offsets written into an archive pg_dump streamed to a pipe, on a real server: pg_restore reads it,
the offsets are the ones pg_dump writes to a file, and a parallel restore gives the same tables."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from saveit_backup import sample
from saveit_backup.pg.cluster import Cluster
from saveit_backup.pg.custom_archive import K_OFFSET_NO_DATA, K_OFFSET_POS_SET, OffsetRecorder, patch_offsets
from tests.fixtures.pg import Database, cli_for, new_database

pytestmark = pytest.mark.pg


def _scan(path: Path) -> OffsetRecorder:
    rec = OffsetRecorder()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            rec.feed(chunk)
    assert rec.patches() == [] and rec.problem is None
    return rec


def test_piped_dump_patched_like_a_file_dump(runbook_db: Database, tmp_path: Path) -> None:
    runbook_db.sql("SELECT lo_from_bytea(0, '\\x000102000000000000ff'::bytea)")  # a BLOBS block too
    cluster = runbook_db.cluster
    env = dict(os.environ, PGHOST=cluster.host, PGPORT=str(cluster.port))
    piped, to_file = tmp_path / "piped.dump", tmp_path / "file.dump"

    rec = OffsetRecorder()
    proc = subprocess.Popen([cluster.tool("pg_dump"), "-Fc", "-Z0", runbook_db.name], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    with open(piped, "w+b") as out:
        while chunk := proc.stdout.read(65521):  # an odd size: fields split across chunks
            out.write(chunk)
            rec.feed(chunk)
        assert proc.wait() == 0
        out.flush()
        with_data = [e for e in rec.entries.values() if e.flag != K_OFFSET_NO_DATA]
        assert len(with_data) == 6  # five tables and the large objects
        assert patch_offsets(out.fileno(), rec) == len(with_data)
    subprocess.run([cluster.tool("pg_dump"), "-Fc", "-Z0", "-f", str(to_file), runbook_db.name], env=env, check=True)

    listing = subprocess.run([cluster.tool("pg_restore"), "-l", str(piped)], capture_output=True, text=True, check=True)
    assert "TABLE DATA public meter_readings" in listing.stdout and "BLOBS" in listing.stdout

    # Same TOC, same data: the patched offsets are pg_dump's own, and the files differ only in the
    # header's creation time.
    patched, written = _scan(piped), _scan(to_file)
    offsets = {i: (e.flag, e.offset) for i, e in patched.entries.items()}
    assert offsets == {i: (e.flag, e.offset) for i, e in written.entries.items()}
    assert {flag for flag, _ in offsets.values()} == {K_OFFSET_POS_SET, K_OFFSET_NO_DATA}
    a, b = piped.read_bytes(), to_file.read_bytes()
    assert len(a) == len(b) and a[64:] == b[64:]

    target = new_database(cluster, "offsets")
    subprocess.run([cluster.tool("pg_restore"), "-j2", "--exit-on-error", "-d", target.name, str(piped)], env=env, check=True)
    with runbook_db.connect() as src, target.connect() as dst:
        assert sample.row_counts(dst) == sample.row_counts(src)
        assert sample.content_checksums(dst) == sample.content_checksums(src)


def test_cli_parallel_restore_splits_tables_across_connections(runbook_db: Database, repo_dir: Path) -> None:
    runbook_db.sql("SELECT lo_from_bytea(0, '\\x000102000000000000ff'::bytea)")  # "other data": large objects
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    bid = json.loads(cli("--json", "backup").stdout)["id"]
    target = new_database(runbook_db.cluster, "offsets_cli")
    res = cli("restore", bid, "--target-db", target.dsn, "--jobs", "2")
    assert "all equal" in res.stdout
    # The table data is loaded while the archive is decoded, each table's COPY text split over both
    # connections; the row counts are COPY's, so none is left to count afterwards.
    assert "decode and table data over 2 connections, COPY text cut from the archive" in res.stderr
    assert "post-data -j2" in res.stderr
    assert "row counts of 0 tables after pg_restore" in res.stderr and "(5 counted during it)" in res.stderr
    with runbook_db.connect() as src, target.connect() as dst:
        assert sample.content_checksums(dst) == sample.content_checksums(src)
        # meter_readings (about 12 MiB of COPY text) was written by two transactions, one per connection.
        assert dst.execute("SELECT count(DISTINCT xmin::text) FROM meter_readings").fetchone() == (2,)
        for query in ("SELECT lo_get(oid) FROM pg_largeobject_metadata",
                      "SELECT last_value FROM meter_readings_id_seq",
                      "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'",
                      "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"):
            assert dst.execute(query).fetchall() == src.execute(query).fetchall(), query


def test_parallel_restore_of_awkward_rows(runbook_db: Database, repo_dir: Path) -> None:
    """The COPY loader cuts COPY text at line ends: rows longer than its 1 MiB blocks, escaped line breaks,
    tabs and backslashes, many tiny rows, an empty table, and a table in a schema with a quoted name."""
    runbook_db.sql(
        "CREATE TABLE wide_rows (id int, t text, b bytea);"
        "INSERT INTO wide_rows SELECT i, repeat(md5(i::text), 20000 * i), decode(repeat('0a00ff5c', 30000), 'hex')"
        " FROM generate_series(1, 4) i;"  # rows of 0.9 to 2.8 MB of COPY text
        "CREATE TABLE tiny_rows (i int); INSERT INTO tiny_rows SELECT generate_series(1, 1200000);"  # 8 MiB, 8 blocks
        "CREATE TABLE escaped (t text, b bytea);"
        "INSERT INTO escaped SELECT E'line\\nbreak\\ttab\\\\slash\\r\\\\.' || i, decode('0a0d0009' || lpad(to_hex(i), 8, '0'), 'hex')"
        " FROM generate_series(1, 3000) i;"
        "CREATE TABLE empty_one (i int);"
        'CREATE SCHEMA "Odd Schema"; CREATE TABLE "Odd Schema"."Mixed Case" (v text);'
        """INSERT INTO "Odd Schema"."Mixed Case" SELECT repeat('\\', i % 7) FROM generate_series(1, 50000) i;""")
    tables = ("public.wide_rows", "public.tiny_rows", "public.escaped", "public.empty_one", '"Odd Schema"."Mixed Case"')
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    bid = json.loads(cli("--json", "backup").stdout)["id"]
    target = new_database(runbook_db.cluster, "awkward")
    res = cli("restore", bid, "--target-db", target.dsn, "--jobs", "3")
    assert "all equal (10 tables)" in res.stdout and "decode and table data over 3 connections" in res.stderr
    with runbook_db.connect() as src, target.connect() as dst:
        for table in tables:
            query = f"SELECT md5(string_agg(x::text, ',' ORDER BY x::text)), count(*) FROM {table} x"
            assert dst.execute(query).fetchone() == src.execute(query).fetchone(), table
        # Blocks go to whichever writer is free first, so how many of the three took part depends on timing;
        # at least two did, or the cuts were never tested across connections.
        (writers,) = dst.execute("SELECT count(DISTINCT xmin::text) FROM tiny_rows").fetchone()
        assert writers >= 2


def test_parallel_restore_of_a_latin1_database(pg_cluster: Cluster, repo_dir: Path) -> None:
    """Names outside UTF-8 reach the server as the archive's bytes (pg_restore's listing and COPY lines)."""
    def latin1(prefix: str) -> Database:
        db = Database(pg_cluster, f"{prefix}_{uuid.uuid4().hex[:8]}")
        pg_cluster.psql(f"CREATE DATABASE {db.name} ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
        return db

    source = latin1("latin")
    with source.connect() as conn:
        conn.execute('CREATE TABLE "café" (id int PRIMARY KEY, note text)')
        conn.execute("""INSERT INTO "café" SELECT i, 'crème brûlée ' || i FROM generate_series(1, 100000) i""")
    cli = cli_for(source, f"file://{repo_dir}")
    bid = json.loads(cli("--json", "backup").stdout)["id"]
    target = latin1("latin_copy")
    res = cli("restore", bid, "--target-db", target.dsn, "--jobs", "2")
    assert "all equal (1 tables)" in res.stdout and "decode and table data over 2 connections" in res.stderr
    query = """SELECT md5(string_agg(note, ',' ORDER BY id)), count(*) FROM "café\""""
    with source.connect() as src, target.connect() as dst:
        assert dst.execute(query).fetchone() == src.execute(query).fetchone()
