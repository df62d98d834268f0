"""Logical backups on a real S3 HTTP endpoint (moto server), configured with the runbook's variables."""

from __future__ import annotations

import json

import pytest

from saveit_backup import sample
from tests.fixtures.pg import Database, cli_for, new_database
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.pg, pytest.mark.s3]


def s3_env(server: S3Server, bucket: str) -> dict[str, str]:
    """Exactly the runbook's names, plus the endpoint of an S3-compatible store."""
    return {"BACKUP_REPOSITORY": "", "BACKUP_ENABLED": "true", "BACKUP_S3_BUCKET": bucket, "BACKUP_RETENTION_DAYS": "30",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_REGION": "us-east-1", "BACKUP_S3_PATH_STYLE": "true"}


def test_backup_to_s3_restore_into_other_database(runbook_db: Database, s3_server: S3Server, s3_bucket: str) -> None:
    cli = cli_for(runbook_db, "")
    env = {**s3_env(s3_server, s3_bucket), "BACKUP_ENCRYPTION_PASSPHRASE": "s3-secret"}
    shown = cli("--json", "config", "show", env=env).stdout
    assert json.loads(shown)["repository_url"]["value"] == f"s3://{s3_bucket}/"
    assert "s3-secret" not in shown and json.loads(shown)["aws_secret_access_key"]["value"] == "****"

    out = json.loads(cli("--json", "backup", env=env).stdout)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert f"backups/{out['id']}/manifest.json" in keys and f"backups/{out['id']}/database.dump" in keys
    assert "config.json" in keys

    target = new_database(runbook_db.cluster, "s3restore")
    res = cli("restore", "latest", "--target-db", target.dsn, env=env)
    assert "all equal" in res.stdout
    with runbook_db.connect() as a, target.connect() as b:
        assert sample.content_checksums(a) == sample.content_checksums(b)
    assert "ok" in cli("verify", "--all", env=env).stdout


def test_s3_errors_are_classified(database: Database, s3_server: S3Server, s3_bucket: str) -> None:
    cli = cli_for(database, "")
    missing = cli("backup", env=s3_env(s3_server, "no-such-bucket-saveit"), check=False)
    assert missing.returncode == 5 and "SVB-303" in missing.stderr, missing.stderr
    down = cli("backup", env={**s3_env(s3_server, s3_bucket), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, check=False)
    assert down.returncode == 7 and "SVB-320" in down.stderr, down.stderr
    with s3_server.enforce_auth():
        denied = cli("list", env={**s3_env(s3_server, s3_bucket), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}, check=False)
    assert denied.returncode == 6 and "SVB-310" in denied.stderr and "wrong-secret" not in denied.stderr, denied.stderr
