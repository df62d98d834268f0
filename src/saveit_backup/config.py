"""One typed configuration: CLI flags > environment > config file (TOML) > defaults.

Every setting is declared once in ``FIELDS`` with its environment names (the
runbook's names among them), type, default and whether it is a secret.
Secrets are masked in ``config show`` and never logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from saveit_backup.errors import ConfigError


class Field(NamedTuple):
    name: str
    env: tuple[str, ...]
    kind: type
    default: Any
    help: str
    secret: bool = False


def _f(name: str, env: str | tuple[str, ...], kind: type, default: Any, help: str, secret: bool = False) -> Field:
    return Field(name, (env,) if isinstance(env, str) else env, kind, default, help, secret)


FIELDS: tuple[Field, ...] = (
    _f("enabled", "BACKUP_ENABLED", bool, True, "scheduled backups run (false: the service idles)"),
    _f("repository", "BACKUP_REPOSITORY", str, "", "repository URL: file:///path or s3://bucket/prefix"),
    _f("s3_bucket", "BACKUP_S3_BUCKET", str, "", "S3 bucket; selects s3://BUCKET/ when BACKUP_REPOSITORY is unset"),
    _f("s3_prefix", "BACKUP_S3_PREFIX", str, "", "key prefix inside BACKUP_S3_BUCKET"),
    _f("s3_path_style", "BACKUP_S3_PATH_STYLE", bool, False, "path-style S3 addressing (MinIO, Ceph, moto)"),
    _f("aws_access_key_id", "AWS_ACCESS_KEY_ID", str, "", "S3 access key id", secret=True),
    _f("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", str, "", "S3 secret key", secret=True),
    _f("aws_session_token", "AWS_SESSION_TOKEN", str, "", "S3 session token", secret=True),
    _f("aws_endpoint_url", ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"), str, "", "S3-compatible endpoint URL"),
    _f("aws_region", ("AWS_REGION", "AWS_DEFAULT_REGION"), str, "us-east-1", "S3 region"),
    _f("retention_days", "BACKUP_RETENTION_DAYS", int, 30, "days to keep full and logical backups"),
    _f("incremental_retention_days", "BACKUP_INCREMENTAL_RETENTION_DAYS", int, 7, "days to keep diff/incr backups"),
    _f("wal_retention_days", "BACKUP_WAL_RETENTION_DAYS", int, 7, "point-in-time window in days"),
    _f("retention_count", "BACKUP_RETENTION_COUNT", int, 0, "always keep this many newest full/logical backups (0: off)"),
    _f("environment", "BACKUP_ENVIRONMENT", str, "", "environment label stored in every backup (prod, staging...)"),
    _f("encryption_passphrase", "BACKUP_ENCRYPTION_PASSPHRASE", str, "", "passphrase for client-side encryption", secret=True),
    _f("encryption_recipients", "BACKUP_ENCRYPTION_RECIPIENTS", list, [], "public keys (saveit-pub-...) to encrypt for"),
    _f("key_cache_dir", "BACKUP_KEY_CACHE_DIR", str, "", "where passphrase-derived keys are kept between processes (default"
       " /dev/shm/saveit-backup-UID, memory only; off: derived by every process)"),
    _f("encryption_identity", "BACKUP_ENCRYPTION_IDENTITY", str, "", "private key file for reading recipient-encrypted backups"),
    _f("compression", "BACKUP_COMPRESSION", str, "zstd", "zstd, lz4, gzip or none"),
    _f("compression_level", "BACKUP_COMPRESSION_LEVEL", int, -1, "codec level (-1: the codec's default)"),
    _f("compression_threads", "BACKUP_COMPRESSION_THREADS", int, 2, "zstd worker threads"),
    _f("jobs", "BACKUP_JOBS", int, 2, "parallel workers for backup and restore"),
    _f("dbname", "DATABASE_URL", str, "", "database to back up (DSN or URL; PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE also apply)"),
    _f("pg_bindir", "BACKUP_PG_BINDIR", str, "", "directory of the PostgreSQL tools: pg_dump, pg_basebackup, pg_ctl"
       " (default: newest installed; pg_ctl must match the backup's major)"),
    _f("pgdata", "BACKUP_PGDATA", str, "", "data directory for local physical backups"),
    _f("incremental_xor", "BACKUP_INCREMENTAL_XOR", str, "auto", "diff/incr (local mode) store changed pages as XOR with the"
       " reference backup's page, read back from the repository: on, off, auto (on for file:// repositories)"),
    _f("physical_mode", "BACKUP_PHYSICAL_MODE", str, "", "full/incr: local, remote, or empty (local with BACKUP_PGDATA, else logical)"),
    _f("restore_pre_hook", "BACKUP_RESTORE_PRE_HOOK", str, "", "shell command run before a restore (e.g. stop the app)"),
    _f("restore_post_hook", "BACKUP_RESTORE_POST_HOOK", str, "", "shell command run after a restore, success or not"),
    _f("schedule_full", "BACKUP_SCHEDULE_FULL", str, "0 2 * * *", "cron (UTC) for full backups; empty disables"),
    _f("schedule_incremental", "BACKUP_SCHEDULE_INCREMENTAL", str, "0 * * * *", "cron (UTC) for incremental backups"),
    _f("schedule_logical", "BACKUP_SCHEDULE_LOGICAL", str, "", "cron (UTC) for logical backups"),
    _f("schedule_verify", "BACKUP_SCHEDULE_VERIFY", str, "30 3 * * *", "cron (UTC) for verify"),
    _f("schedule_restore_test", "BACKUP_SCHEDULE_RESTORE_TEST", str, "0 4 1 * *", "cron (UTC) for restore tests"),
    _f("http_host", "BACKUP_HTTP_HOST", str, "127.0.0.1", "address of the service's HTTP endpoints"),
    _f("http_port", "BACKUP_HTTP_PORT", int, 9187, "port of the service's HTTP endpoints"),
    _f("rpo_seconds", "BACKUP_RPO_SECONDS", int, 3600, "recovery point objective"),
    _f("rto_seconds", "BACKUP_RTO_SECONDS", int, 1800, "recovery time objective"),
    _f("webhook_url", "BACKUP_WEBHOOK_URL", str, "", "called on failure and on objective breach", secret=True),
    _f("heartbeat_url", "BACKUP_HEARTBEAT_URL", str, "", "called after each success (dead man's switch)", secret=True),
    _f("archive_async", "BACKUP_ARCHIVE_ASYNC", bool, False, "wal-push hands segments to a background worker"),
    _f("archive_queue_max", "BACKUP_ARCHIVE_QUEUE_MAX", int, 0, "max queued segments before dropping (0: unlimited)"),
    _f("spool_dir", "BACKUP_SPOOL_DIR", str, "", "spool directory for async archiving"),
    _f("log_format", "BACKUP_LOG_FORMAT", str, "text", "text or json"),
)
BY_NAME = {f.name: f for f in FIELDS}
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def default_repository() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return f"file://{base}/saveit-backup/repository"


class Settings:
    """Resolved values (``settings.<field name>``) and where each came from."""

    __slots__ = ("sources", "values")

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        self.values = values
        self.sources = sources

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in Settings.__slots__:  # not a setting (e.g. pickle probing a half-built copy)
            raise AttributeError(name)
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def repository_url(self) -> str:
        if self.values["repository"]:
            return str(self.values["repository"])
        if self.values["s3_bucket"]:
            prefix = str(self.values["s3_prefix"]).strip("/")
            return f"s3://{self.values['s3_bucket']}/{prefix}"
        return default_repository()

    @property
    def page_xor(self) -> bool:
        """diff/incr pages as XOR with the reference's: on, off, or auto (file repositories, where reading the
        reference back costs no download)."""
        from saveit_backup.storage.registry import url_scheme

        mode = self.values["incremental_xor"]
        return bool(mode == "on" or (mode == "auto" and url_scheme(self.repository_url) == "file"))

    def with_values(self, **overrides: Any) -> Settings:
        values = dict(self.values)
        values.update(overrides)
        sources = dict(self.sources)
        sources.update({k: "derived" for k in overrides})
        return Settings(values, sources)

    def shown(self) -> list[tuple[str, str, str, str]]:
        """(name, env var, value, source) with secrets masked."""
        rows = []
        for f in FIELDS:
            value = self.values[f.name]
            text = ("****" if value else "") if f.secret else (",".join(value) if isinstance(value, list) else str(value))
            rows.append((f.name, f.env[0], text, self.sources[f.name]))
        rows.append(("repository_url", "", self.repository_url, "derived"))
        return rows


def _convert(f: Field, raw: Any, source: str) -> Any:
    try:
        if f.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in TRUE:
                return True
            if text in FALSE:
                return False
            raise ValueError(raw)
        if f.kind is int:
            return int(raw)
        if f.kind is list:
            if isinstance(raw, list):
                return [str(x) for x in raw]
            return [p for p in str(raw).replace(",", " ").split() if p]
        return str(raw)
    except (TypeError, ValueError):
        shown = "****" if f.secret else repr(raw)
        raise ConfigError(f"{f.env[0]} ({source}) must be a {f.kind.__name__}, got {shown}") from None


# One line of the TOML subset a configuration file usually is: blank, a comment, or ``key = value`` with a
# bare key and a value that is a string without escapes, a decimal integer or a boolean (see _simple_toml).
_CTRL = "\\x00-\\x08\\x0a-\\x1f\\x7f"  # control characters TOML forbids in strings and comments (tab is allowed)
_SIMPLE_LINE = (rf"[ \t]*(?:([A-Za-z0-9_-]+)[ \t]*=[ \t]*"
                rf"(\"[^\"\\\\{_CTRL}]*\"|'[^'{_CTRL}]*'|true|false|0|[+-]?[1-9][0-9]*)[ \t]*)?(?:#[^{_CTRL}]*)?")


def _simple_toml(text: str) -> dict[str, Any] | None:
    """``text`` parsed when every line is in the subset above (what tomllib would return); None otherwise.

    wal-push and wal-fetch read the configuration once per WAL file, and importing tomllib (with
    datetime and its regular expressions) costs about 6 ms of each call here; anything beyond the subset,
    and any error (a repeated key), goes to tomllib, which decides."""
    import re

    out: dict[str, Any] = {}
    for line in text.replace("\r\n", "\n").split("\n"):  # as tomllib: only CRLF is a line end, a lone CR is not
        m = re.fullmatch(_SIMPLE_LINE, line)
        if m is None:
            return None
        key, value = m.group(1), m.group(2)
        if key is None:
            continue
        if key in out:
            return None
        if value[0] in "\"'":
            out[key] = value[1:-1]
        elif value in ("true", "false"):
            out[key] = value == "true"
        elif len(value) > 20:  # beyond 64 bits (and int()'s digit limit): tomllib reports it
            return None
        else:
            out[key] = int(value)
    return out


def _read_toml(text: str, path: str) -> dict[str, Any]:
    simple = _simple_toml(text)
    if simple is not None:
        return simple
    import tomllib

    try:
        return tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of more digits than int() converts
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load(cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None, config_file: str | None = None) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {f.name: f.default for f in FIELDS}
    sources = {f.name: "default" for f in FIELDS}
    path = config_file or env.get("BACKUP_CONFIG")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = _read_toml(fh.read(), path)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        for key, raw in data.items():
            if key not in BY_NAME:
                raise ConfigError(f"config file {path}: unknown setting {key!r}", hint="see 'saveit-backup config show' for the names")
            values[key] = _convert(BY_NAME[key], raw, f"file {path}")
            sources[key] = f"file {path}"
    for f in FIELDS:
        for name in f.env:
            if name in env:
                values[f.name] = _convert(f, env[name], f"env {name}")
                sources[f.name] = f"env {name}"
                break
    for key, raw in (cli or {}).items():
        if raw is None:
            continue
        values[key] = _convert(BY_NAME[key], raw, "command line")
        sources[key] = "command line"
    values["dbname"] = as_conninfo(values["dbname"])
    settings = Settings(values, sources)
    _validate(settings)
    return settings


def as_conninfo(dbname: str) -> str:
    """A bare database name (``postgres``, as psql and pg_dump take it) as the conninfo ``dbname='postgres'``;
    DSNs (``key=value ...``) and URLs (``postgresql://...``) as they are."""
    if not dbname or "=" in dbname or "://" in dbname:
        return dbname
    quoted = dbname.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{quoted}'"


def _validate(s: Settings) -> None:
    from saveit_backup.pipeline.compress import check_codec

    check_codec(s.compression)
    for name in ("retention_days", "incremental_retention_days", "wal_retention_days"):
        if s.values[name] < 1:
            raise ConfigError(f"{BY_NAME[name].env[0]} must be at least 1 day")
    if s.incremental_xor not in ("auto", "on", "off"):
        raise ConfigError("BACKUP_INCREMENTAL_XOR must be auto, on or off")
    if s.physical_mode not in ("", "local", "remote"):
        raise ConfigError("BACKUP_PHYSICAL_MODE must be local, remote or empty")
    if s.log_format not in ("text", "json"):
        raise ConfigError("BACKUP_LOG_FORMAT must be text or json")
