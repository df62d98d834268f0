"""Configuration: precedence, the runbook's names, masking, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from saveit_backup import config
from saveit_backup.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "expected_url"),
    [
        ({}, None),  # embedded default: a local directory
        ({"BACKUP_S3_BUCKET": "saveit-backups"}, "s3://saveit-backups/"),
        ({"BACKUP_S3_BUCKET": "saveit-backups", "BACKUP_S3_PREFIX": "database/"}, "s3://saveit-backups/database"),
        ({"BACKUP_REPOSITORY": "file:///srv/backups", "BACKUP_S3_BUCKET": "ignored"}, "file:///srv/backups"),
        ({"BACKUP_REPOSITORY": "s3://b/p"}, "s3://b/p"),
    ],
)
def test_repository_url(env: dict[str, str], expected_url: str | None) -> None:
    settings = config.load(environ=env)
    if expected_url is None:
        assert settings.repository_url.startswith("file://") and settings.repository_url.endswith("saveit-backup/repository")
    else:
        assert settings.repository_url == expected_url


def test_runbook_names_and_defaults() -> None:
    s = config.load(environ={"BACKUP_ENABLED": "false", "BACKUP_RETENTION_DAYS": "14", "AWS_ACCESS_KEY_ID": "AKIA",
                             "AWS_SECRET_ACCESS_KEY": "sekret", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert s.enabled is False and s.retention_days == 14 and s.aws_region == "eu-west-1"
    assert s.incremental_retention_days == 7 and s.wal_retention_days == 7
    assert s.schedule_full == "0 2 * * *" and s.schedule_incremental == "0 * * * *"
    assert s.rpo_seconds == 3600 and s.rto_seconds == 1800


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    f = tmp_path / "saveit.toml"
    f.write_text('retention_days = 10\ncompression = "lz4"\njobs = 3\nencryption_recipients = ["saveit-pub-a"]\n')
    s = config.load({"jobs": 5}, environ={"BACKUP_RETENTION_DAYS": "20"}, config_file=str(f))
    assert (s.retention_days, s.compression, s.jobs) == (20, "lz4", 5)
    assert s.sources["retention_days"] == "env BACKUP_RETENTION_DAYS"
    assert s.sources["compression"] == f"file {f}" and s.sources["jobs"] == "command line"
    assert s.encryption_recipients == ["saveit-pub-a"]


def test_secrets_masked() -> None:
    s = config.load(environ={"BACKUP_ENCRYPTION_PASSPHRASE": "p4ss", "AWS_SECRET_ACCESS_KEY": "k3y"})
    text = repr(s.shown())
    assert "p4ss" not in text and "k3y" not in text and "****" in text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, True),  # the embedded default is a local directory
        ({"BACKUP_REPOSITORY": "file:///srv/backups"}, True),
        ({"BACKUP_REPOSITORY": "/srv/backups"}, True),  # a plain path is a local directory too
        ({"BACKUP_REPOSITORY": "FILE:///srv/backups"}, True),
        ({"BACKUP_S3_BUCKET": "b"}, False),  # would download the reference's changed files at every incremental
        ({"BACKUP_S3_BUCKET": "b", "BACKUP_INCREMENTAL_XOR": "on"}, True),
        ({"BACKUP_INCREMENTAL_XOR": "off"}, False),
    ],
)
def test_incremental_page_xor(env: dict[str, str], expected: bool) -> None:
    assert config.load(environ=env).page_xor is expected


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"BACKUP_INCREMENTAL_XOR": "yes"}, "BACKUP_INCREMENTAL_XOR must be auto, on or off"),
        ({"BACKUP_RETENTION_DAYS": "thirty"}, "BACKUP_RETENTION_DAYS"),
        ({"BACKUP_ENABLED": "maybe"}, "BACKUP_ENABLED"),
        ({"BACKUP_COMPRESSION": "brotli"}, "unknown compression"),
        ({"BACKUP_RETENTION_DAYS": "0"}, "at least 1 day"),
        ({"BACKUP_ENCRYPTION_PASSPHRASE": "x", "BACKUP_JOBS": "many"}, "BACKUP_JOBS"),
    ],
)
def test_bad_values_are_clear_errors(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(environ=env)
    assert fragment in str(info.value) and info.value.exit_status == 2


def test_unknown_file_key_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("retention_dayz = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'retention_dayz'"):
        config.load(environ={}, config_file=str(f))


@pytest.mark.parametrize(("given", "conninfo"), [
    ("postgres", "dbname='postgres'"),  # a bare name, as psql and pg_dump take it
    ("it's", "dbname='it\\'s'"),
    ("host=/tmp dbname=app", "host=/tmp dbname=app"),
    ("postgresql://u@h/app", "postgresql://u@h/app"),
    ("", ""),
])
def test_bare_database_names_become_conninfo(given: str, conninfo: str) -> None:
    assert config.as_conninfo(given) == conninfo
    assert config.load({"dbname": given}, environ={}).dbname == conninfo


# --- the TOML subset read without tomllib (wal-push reads the configuration once per WAL file) ---------------------
SIMPLE = [
    "",
    "\n\n",
    'repository = "file:///var/lib/saveit/repo"\n',
    "# archive settings\nrepository = 'file:///srv/x y'   # literal string\njobs = 4\narchive_async = true\n",
    'encryption_passphrase = "caf\u00e9 \t tab & #hash inside"\r\nretention_days = 30\r\n',
    "compression_level = -1\nenabled = false\ns3_prefix = ''\nhttp_port = +9187\n",
    "key-with_dash = 0\n   indented = \"x\"\t# comment with 'quotes' and \"more\"\n",
]
FALLBACK = [  # valid TOML beyond the subset: tomllib parses it
    'encryption_passphrase = "a\\"quoted\\" word"\n',
    "encryption_recipients = [\"saveit-pub-a\", \"saveit-pub-b\"]\n",
    'jobs = 1_000\n',
    '"quoted key" = 1\n',
    "[section]\nkey = 1\n",
    'ratio = 0.5\n',
    'multi = """x"""\n',
    'zero = -0\n',
]
INVALID = [  # not TOML: tomllib reports it
    'jobs = 01\n',
    'a = 1\na = 2\n',
    'a = "x" trailing\n',
    'a = "bell\x07"\n',
    'a = "unterminated\n',
    "a = True\n",
    "a = 1\r",  # a lone CR is not a line end
    "jobs = " + "1" * 5000 + "\n",  # more digits than int() converts
]


@pytest.mark.parametrize("text", SIMPLE)
def test_simple_toml_reads_what_tomllib_reads(text: str) -> None:
    import tomllib

    assert config._simple_toml(text) is not None
    assert config._simple_toml(text) == tomllib.loads(text)


@pytest.mark.parametrize("text", FALLBACK + INVALID)
def test_anything_else_goes_to_tomllib(text: str) -> None:
    import tomllib

    assert config._simple_toml(text) is None
    try:
        expected: dict[str, Any] | None = tomllib.loads(text)
    except ValueError:  # TOMLDecodeError, or an integer int() refuses
        expected = None
    if expected is None:
        with pytest.raises(ConfigError, match="not valid TOML"):
            config._read_toml(text, "f.toml")
    else:
        assert config._read_toml(text, "f.toml") == expected
