"""``saveit-backup serve`` end to end: the real process, seconds-level schedules, real PostgreSQL and S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from saveit_backup.pg.cluster import Cluster, free_port
from tests.fixtures.pg import CLI, Cli, Database, cli_for, new_runbook_database
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.pg

NO_SCHEDULES = {"BACKUP_SCHEDULE_FULL": "", "BACKUP_SCHEDULE_INCREMENTAL": "", "BACKUP_SCHEDULE_LOGICAL": "",
                "BACKUP_SCHEDULE_VERIFY": "", "BACKUP_SCHEDULE_RESTORE_TEST": ""}


def s3_env(endpoint: str, bucket: str) -> dict[str, str]:
    return {"BACKUP_REPOSITORY": "", "BACKUP_S3_BUCKET": bucket, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "BACKUP_S3_PATH_STYLE": "true"}


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Service:
    """The installed console script running ``serve`` (JSON logs to a file)."""

    def __init__(self, cli: Cli, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.env = {**cli.env, **NO_SCHEDULES, "BACKUP_HTTP_PORT": str(self.port), **env}
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([CLI, "--log-format", "json", "serve", "--refresh", "1", *self.args], env=self.env,
                                         stdout=subprocess.DEVNULL, stderr=log)
        wait_for("the service to listen", lambda: self.alive_or_raise() and self.get("/health/live")[0] == 200, 30)
        return self

    def alive_or_raise(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return True

    def get(self, path: str, accept: str = "") -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[tuple[str, str], float]:
        """{(sample name, label value or ""): value}: every metric here has at most one label."""
        code, text = self.get("/metrics")
        assert code == 200
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, next(iter(s.labels.values()), ""))] = s.value
        return out

    def status(self) -> dict[str, Any]:
        code, text = self.get("/status?format=json")
        assert code == 200
        return dict(json.loads(text))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> tuple[int, float]:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def events(self, event: str, job: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == event and (job is None or r.get("job") == job)]


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.kill()


class Hooks:
    """A tiny HTTP endpoint recording webhook POSTs and heartbeat GETs."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.gets: list[str] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hooks.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def do_GET(self) -> None:
                hooks.gets.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [p for p in self.posts if p.get("event") == name]


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.server.shutdown()


@pytest.fixture
def app_db(pg_cluster: Cluster) -> Database:
    """The runbook's tables with little data (2 cores are shared)."""
    return new_runbook_database(pg_cluster, "svc", 3000)


def last_success(m: dict[tuple[str, str], float]) -> float:
    return m.get(("saveit_backup_last_success_timestamp_seconds", "logical"), 0.0)


# --- end to end on S3 --------------------------------------------------------------------
@pytest.mark.s3
def test_serve_backs_up_on_schedule_with_metrics_status_and_notifications(
        app_db: Database, s3_server: S3Server, s3_bucket: str, hooks: Hooks, tmp_path: Path, services: list[Service]) -> None:
    cli = cli_for(app_db, "")
    env = {**NO_SCHEDULES, **s3_env(s3_server.endpoint_url, s3_bucket), "BACKUP_SCHEDULE_LOGICAL": "*/5 * * * * *",
           "BACKUP_SCHEDULE_VERIFY": "*/7 * * * * *", "BACKUP_SCHEDULE_RESTORE_TEST": "*/13 * * * * *",
           "BACKUP_RPO_SECONDS": "120", "BACKUP_RTO_SECONDS": "300",
           "BACKUP_WEBHOOK_URL": f"{hooks.url}/hook", "BACKUP_HEARTBEAT_URL": f"{hooks.url}/beat"}
    svc = Service(cli, env, tmp_path / "serve.log")
    services.append(svc)
    svc.start()
    first = wait_for("a first logical backup in /metrics", lambda: last_success(svc.metrics()), 40)
    m = svc.metrics()
    assert m[("saveit_backup_last_size_bytes", "logical")] > 0
    assert m[("saveit_backup_last_duration_seconds", "logical")] > 0
    assert m[("saveit_backup_enabled", "")] == 1
    assert m[("saveit_objective_rpo_seconds", "")] == 120 and m[("saveit_objective_rto_seconds", "")] == 300
    assert ("saveit_job_running", "logical") in m and ("saveit_job_running", "verify") in m
    assert m[("saveit_repository_size_bytes", "")] >= m[("saveit_backup_last_size_bytes", "logical")]
    assert 0 <= m[("saveit_wal_archive_lag_seconds", "")] < 60
    assert m[("saveit_wal_archive_queue_dropped_total", "")] == 0

    wait_for("a later logical backup", lambda: last_success(svc.metrics()) > first, 30)
    m = wait_for("a restore test", lambda: (x := svc.metrics()).get(("saveit_restore_test_last_success", "")) == 1 and x, 40)
    assert 0 < m[("saveit_restore_test_last_duration_seconds", "")] < 300
    assert m[("saveit_pitr_window_start_timestamp_seconds", "")] <= m[("saveit_pitr_window_end_timestamp_seconds", "")]
    wait_for("a verify run", lambda: svc.events("job_end", "verify"), 20)
    assert all(m[("saveit_backup_failures_total", j)] == 0 for j in ("logical", "verify", "restore_test"))

    assert svc.get("/health/live")[0] == 200
    code, ready = svc.get("/health/ready")
    assert code == 200 and json.loads(ready)["checks"]["database"]["ok"], ready
    status = svc.status()
    assert status["backups"]["logical"]["stored_bytes"] > 0 and status["service"]["enabled"]
    assert json.loads(svc.get("/status", accept="application/json")[1])["repository"] == f"s3://{s3_bucket}/"
    code, page = svc.get("/status")
    assert code == 200 and "<h1>saveit-backup</h1>" in page and "Objectives" in page

    # the CLI computes the same report from the repository alone
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["objectives"]["rpo"]["status"] == "met" and report["objectives"]["rpo"]["actual_seconds"] < 120
    assert report["objectives"]["rto"]["status"] == "met"
    assert report["restore_test"]["ok"] and report["restore_test"]["scratch_database"].startswith(f"{app_db.name}_restore_test_")
    assert report["schedules"]["logical"]["next"] and report["schedules"]["full"]["disabled"]
    text = cli("status", env=env).stdout
    assert "RPO: MET" in text and "RTO: MET" in text and "*/5 * * * * *" in text
    scratch = app_db.cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%restore_test%'")
    assert scratch == "0"  # dropped after each test

    assert hooks.gets and all(g == "/beat" for g in hooks.gets)  # heartbeat after successes
    assert not hooks.events("job_failed")
    rc, seconds = svc.stop()
    assert rc == 0 and seconds < 70
    starts, ends = svc.events("job_start", "logical"), svc.events("job_end", "logical")
    assert starts and ends
    done = [e for e in ends if e["outcome"] == "success"]
    assert done and all(e["backup_id"].endswith("L") and e["bytes"] > 0 and e["duration_seconds"] > 0 for e in done)


@pytest.mark.s3
def test_survives_the_s3_endpoint_going_away(app_db: Database, hooks: Hooks, tmp_path: Path, services: list[Service]) -> None:
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    server.client().create_bucket(Bucket="svb-outage")
    try:
        cli = cli_for(app_db, "")
        env = {**s3_env(server.endpoint_url, "svb-outage"), "BACKUP_SCHEDULE_LOGICAL": "*/4 * * * * *",
               "BACKUP_WEBHOOK_URL": f"{hooks.url}/hook", "BACKUP_RPO_SECONDS": "3600"}
        svc = Service(cli, env, tmp_path / "serve.log", "--retry-base", "1")
        services.append(svc)
        svc.start()
        before = wait_for("a first backup", lambda: last_success(svc.metrics()), 40)

        moto.stop()
        m = wait_for("failures counted", lambda: (x := svc.metrics())[("saveit_backup_failures_total", "logical")] >= 2 and x, 60)
        assert last_success(m) == before  # the last good figures stay, the lag keeps growing
        wait_for("the repository error in /status", lambda: svc.status()["repository_error"], 30)
        assert svc.get("/health/live")[0] == 200
        assert svc.get("/health/ready")[0] == 503
        failed = wait_for("a failure webhook", lambda: hooks.events("job_failed"), 20)
        assert failed[0]["job"] == "logical" and failed[0]["error"]["code"].startswith("SVB-")

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
        wait_for("backups to resume", lambda: last_success(svc.metrics()) > before, 60)
        assert svc.status()["repository_error"] is None or wait_for(
            "the error to clear", lambda: svc.status()["repository_error"] is None, 10)
        assert svc.get("/health/ready")[0] == 200
        assert len(hooks.events("job_failed")) <= 3  # deduplicated, not one per attempt
        rc, _ = svc.stop()
        assert rc == 0
        listed = json.loads(cli("--json", "list", env=env).stdout)["backups"]
        assert len(listed) >= 2 and all(b["status"] == "ok" for b in listed)
    finally:
        moto.stop()


# --- shutdown -------------------------------------------------------------------------------
def test_sigterm_during_a_backup_exits_within_grace_and_commits_nothing(
        app_db: Database, tmp_path: Path, services: list[Service]) -> None:
    # a slow backup: a table of 7 MB compressed with zstd level 19 on one thread takes tens of seconds here
    app_db.sql("CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS payload FROM generate_series(1, 100000) g")
    repo = tmp_path / "repo"
    cli = cli_for(app_db, f"file://{repo}")
    env = {"BACKUP_SCHEDULE_LOGICAL": "*/2 * * * * *", "BACKUP_COMPRESSION_LEVEL": "19", "BACKUP_COMPRESSION_THREADS": "1"}
    grace = 3.0
    svc = Service(cli, env, tmp_path / "serve.log", "--grace", str(grace))
    services.append(svc)
    svc.start()
    wait_for("the backup to start", lambda: svc.metrics()[("saveit_job_running", "logical")] == 1, 20)
    wait_for("objects being written", lambda: any((repo / "backups").rglob("*")) if (repo / "backups").exists() else False, 20)
    rc, seconds = svc.stop()
    assert rc == 0
    assert seconds < grace + 4, f"took {seconds:.1f} s"
    print(f"\nSIGTERM during a backup: serve exited in {seconds:.1f} s (grace {grace:.0f} s)")
    aborted = svc.events("job_end", "logical")
    assert aborted and aborted[-1]["outcome"] == "aborted"

    # nothing committed, nothing of pg_dump left, the lock released; expire removes the leftovers
    assert json.loads(cli("--json", "list").stdout)["backups"] == []
    wait_for("pg_dump to be gone", lambda: app_db.cluster.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{app_db.name}' AND application_name = 'pg_dump'") == "0", 10)
    plan = json.loads(cli("--json", "expire").stdout)
    assert plan["uncommitted"] and plan["delete"] == []
    assert not [p for p in (repo / "backups").rglob("*") if p.is_file()]
    assert json.loads(cli("--json", "expire").stdout)["uncommitted"] == []


def test_a_run_missed_while_down_is_caught_up_once_at_start(database: Database, tmp_path: Path, services: list[Service]) -> None:
    database.sql("CREATE TABLE t AS SELECT generate_series(1, 100) AS id")
    cli = cli_for(database, f"file://{tmp_path / 'repo'}")
    # every 10 s: one run, stop, miss a slot, start again
    env = {"BACKUP_SCHEDULE_LOGICAL": "*/10 * * * * *"}
    svc = Service(cli, env, tmp_path / "serve1.log")
    services.append(svc)
    svc.start()
    wait_for("one backup", lambda: [e for e in svc.events("job_end", "logical") if e["outcome"] == "success"], 30)
    assert svc.stop()[0] == 0
    state = json.loads((tmp_path / "repo" / "service" / "state.json").read_text())
    assert state["jobs"]["logical"]["last_success_slot"]
    time.sleep(10.5)  # a slot passes while the service is down
    again = Service(cli, env, tmp_path / "serve2.log")
    services.append(again)
    again.start()
    catch_up = wait_for("the catch-up run", lambda: [e for e in again.events("job_start", "logical") if e["catch_up"]], 10)
    assert len(catch_up) == 1 and len(again.events("catch_up")) == 1
    wait_for("its end", lambda: again.events("job_end", "logical"), 20)
    assert again.stop()[0] == 0
    assert len([e for e in again.events("job_start", "logical") if e["catch_up"]]) == 1


def test_disabled_service_is_healthy_and_idle(database: Database, tmp_path: Path, services: list[Service]) -> None:
    cli = cli_for(database, f"file://{tmp_path / 'repo'}")
    env = {"BACKUP_ENABLED": "false", "BACKUP_SCHEDULE_LOGICAL": "* * * * * *"}
    svc = Service(cli, env, tmp_path / "serve.log")
    services.append(svc)
    svc.start()
    time.sleep(3)
    assert svc.get("/health/live")[0] == 200
    code, ready = svc.get("/health/ready")
    assert code == 200 and json.loads(ready)["status"] == "idle"
    m = svc.metrics()
    assert m[("saveit_backup_enabled", "")] == 0
    assert not [k for k in m if k[0] == "saveit_job_running"]
    status = svc.status()
    assert status["enabled"] is False and status["backup_count"] == 0
    assert "DISABLED" in svc.get("/status")[1]
    assert not svc.events("job_start")
    assert not (tmp_path / "repo").exists()
    assert "DISABLED" in cli("status", env=env).stdout
    assert svc.stop()[0] == 0


# --- must show ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.s3
def test_serve_for_a_minute(app_db: Database, s3_server: S3Server, s3_bucket: str, tmp_path: Path, services: list[Service]) -> None:
    cli = cli_for(app_db, "")
    env = {**s3_env(s3_server.endpoint_url, s3_bucket), "BACKUP_SCHEDULE_LOGICAL": "*/5 * * * * *",
           "BACKUP_SCHEDULE_VERIFY": "*/7 * * * * *", "BACKUP_RPO_SECONDS": "30"}
    svc = Service(cli, env, tmp_path / "serve.log")
    services.append(svc)
    svc.start()
    seen: list[float] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        svc.alive_or_raise()
        ts = last_success(svc.metrics())
        if ts and (not seen or ts > seen[-1]):
            seen.append(ts)
        time.sleep(1)
    m = svc.metrics()
    listed = json.loads(cli("--json", "list", env=env).stdout)["backups"]
    assert len(listed) >= 8, f"{len(listed)} backups in 60 s"
    assert len(seen) >= 6 and seen == sorted(seen)
    # the metrics describe the newest backup the service has seen (a newer one may have committed since)
    newest = next(b for b in reversed(listed)
                  if abs(datetime.fromisoformat(b["started"].replace("Z", "+00:00")).timestamp() + b["duration_seconds"]
                         - last_success(m)) < 0.2)
    assert newest in listed[-2:]
    assert m[("saveit_backup_last_size_bytes", "logical")] == newest["stored_bytes"]
    assert abs(m[("saveit_backup_last_duration_seconds", "logical")] - newest["duration_seconds"]) < 0.1
    assert m[("saveit_wal_archive_lag_seconds", "")] < 15
    assert m[("saveit_backup_failures_total", "logical")] == 0 and m[("saveit_backup_failures_total", "verify")] == 0
    assert m[("saveit_repository_size_bytes", "")] >= sum(b["stored_bytes"] for b in listed)
    assert svc.status()["objectives"]["rpo"]["status"] == "met"
    verified = [e for e in svc.events("job_end", "verify") if e["outcome"] == "success"]
    assert len(verified) >= 5
    rc, _ = svc.stop()
    assert rc == 0
    print(f"\n60 s of serve: {len(listed)} backups, {len(verified)} verifies, newest {newest['stored_bytes']} bytes stored, "
          f"{newest['duration_seconds']} s; repository {m[('saveit_repository_size_bytes', '')]:.0f} bytes")


def test_restore_test_command(app_db: Database, tmp_path: Path) -> None:
    cli = cli_for(app_db, f"file://{tmp_path / 'repo'}")
    cli("backup")
    result = json.loads(cli("restore-test", "--json").stdout)
    assert result["ok"] and result["duration_seconds"] > 0
    assert {t["table"] for t in result["tables"]} >= {"public.users", "public.meter_readings"}
    queries = {q["query"]: q["rows"] for q in result["sample_queries"]}
    assert queries["SELECT count(*) FROM users"] == 500 and queries["SELECT id, email FROM users LIMIT 5"] == 5
    assert app_db.cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%restore_test%'") == "0"
    report = json.loads(cli("status", "--json").stdout)
    assert report["objectives"]["rto"]["status"] == "met" and report["restore_test"]["backup_id"] == result["backup_id"]
    assert os.path.exists(tmp_path / "repo" / "service" / "restore-test.json")
