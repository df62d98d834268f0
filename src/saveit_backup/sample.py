"""The runbook's schema with generated data: for the demo, tests and benchmarks."""

from __future__ import annotations

from typing import Any

RUNBOOK_TABLES = ("organizations", "users", "sites", "meters", "meter_readings")

SCHEMA_SQL = """
CREATE TABLE organizations (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE users (id serial PRIMARY KEY, organization_id int NOT NULL REFERENCES organizations(id),
                    email text NOT NULL UNIQUE, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE sites (id serial PRIMARY KEY, organization_id int NOT NULL REFERENCES organizations(id),
                    name text NOT NULL, timezone text NOT NULL DEFAULT 'UTC');
CREATE TABLE meters (id serial PRIMARY KEY, site_id int NOT NULL REFERENCES sites(id), serial text NOT NULL UNIQUE,
                     kind text NOT NULL);
CREATE TABLE meter_readings (id bigserial PRIMARY KEY, meter_id int NOT NULL REFERENCES meters(id),
                             read_at timestamptz NOT NULL, value numeric(12,3) NOT NULL);
CREATE INDEX meter_readings_meter_time ON meter_readings (meter_id, read_at);
"""


def data_sql(organizations: int = 20, users: int = 500, sites: int = 100, meters: int = 400, readings: int = 300_000) -> str:
    return f"""
INSERT INTO organizations (name) SELECT 'org ' || g FROM generate_series(1, {organizations}) g;
INSERT INTO users (organization_id, email, name)
  SELECT 1 + g % {organizations}, 'user' || g || '@example.com', 'User ' || g FROM generate_series(1, {users}) g;
INSERT INTO sites (organization_id, name) SELECT 1 + g % {organizations}, 'site ' || g FROM generate_series(1, {sites}) g;
INSERT INTO meters (site_id, serial, kind)
  SELECT 1 + g % {sites}, 'SN-' || lpad(g::text, 8, '0'), (ARRAY['electric','gas','water'])[1 + g % 3]
  FROM generate_series(1, {meters}) g;
INSERT INTO meter_readings (meter_id, read_at, value)
  SELECT 1 + g % {meters}, timestamptz '2026-01-01' + g * interval '1 minute', round((random() * 1000)::numeric, 3)
  FROM generate_series(1, {readings}) g;
ANALYZE;
"""


def load(conn: Any, readings: int = 300_000) -> None:
    """Create the runbook's tables and fill them (conn in autocommit mode)."""
    conn.execute(SCHEMA_SQL)
    conn.execute(data_sql(readings=readings))


def row_counts(conn: Any, tables: tuple[str, ...] = RUNBOOK_TABLES) -> dict[str, int]:
    """The runbook's restore-test query: rows per table."""
    return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}


def content_checksums(conn: Any, tables: tuple[str, ...] = RUNBOOK_TABLES) -> dict[str, str]:
    """md5 over each table's rows in a stable order: equal contents give equal sums."""
    out = {}
    for t in tables:
        row = conn.execute(f"SELECT md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '')) FROM {t} x").fetchone()
        out[t] = str(row[0])
    return out
