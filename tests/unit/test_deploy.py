"""Offline validation of the deployment files under deploy/.

* every YAML parses (multi-document);
* Kubernetes manifests against the real Kubernetes JSON schemas shipped by
  ``kubernetes-validate`` (strict: unknown fields are errors);
* docker-compose.yml against the Compose specification schema vendored in
  ``check-jsonschema``, plus structural checks;
* Prometheus rules: structure, every expression parsed with ``promql-parser``,
  metric names limited to the ones saveit-backup exports; ``promtool`` (when
  installed) checks and unit-tests the rules;
* the Grafana dashboard: JSON, datasource templating, expressions and layout;
* the Dockerfile's instructions.

Each validator is also run on a deliberately broken document, so a validator
that accepts everything fails the suite.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "saveit-backup-dashboard.json"

# Oldest Kubernetes minor the manifests must work on (CronJob.spec.timeZone is GA in 1.27).
K8S_VERSION = "1.30.0"
NAMESPACE = "saveit"
RUNBOOK_FULL_SCHEDULE = "0 2 * * *"  # runbook: "Full database | Daily 2 AM UTC"
HTTP_PORT = 9187

METRICS = frozenset(
    {
        "saveit_backup_last_success_timestamp_seconds",
        "saveit_backup_last_duration_seconds",
        "saveit_backup_last_size_bytes",
        "saveit_backup_failures_total",
        "saveit_wal_archive_lag_seconds",
        "saveit_pitr_window_start_timestamp_seconds",
        "saveit_pitr_window_end_timestamp_seconds",
        "saveit_repository_size_bytes",
        "saveit_restore_test_last_success",
        "saveit_restore_test_last_duration_seconds",
        "saveit_restore_test_last_timestamp_seconds",
        "saveit_backup_enabled",
        "saveit_objective_rpo_seconds",
        "saveit_objective_rto_seconds",
        "saveit_wal_archive_queue_dropped_total",
    }
)

KNOWN_ENV = frozenset(
    {
        "BACKUP_ENABLED",
        "BACKUP_REPOSITORY",
        "BACKUP_S3_BUCKET",
        "BACKUP_S3_PREFIX",
        "BACKUP_RETENTION_DAYS",
        "BACKUP_INCREMENTAL_RETENTION_DAYS",
        "BACKUP_WAL_RETENTION_DAYS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "BACKUP_S3_PATH_STYLE",
        "BACKUP_ENVIRONMENT",
        "BACKUP_ENCRYPTION_PASSPHRASE",
        "BACKUP_ENCRYPTION_RECIPIENTS",
        "BACKUP_ENCRYPTION_IDENTITY",
        "BACKUP_SCHEDULE_FULL",
        "BACKUP_SCHEDULE_INCREMENTAL",
        "BACKUP_SCHEDULE_LOGICAL",
        "BACKUP_SCHEDULE_VERIFY",
        "BACKUP_SCHEDULE_RESTORE_TEST",
        "BACKUP_HTTP_PORT",
        "BACKUP_HTTP_HOST",
        "BACKUP_RPO_SECONDS",
        "BACKUP_RTO_SECONDS",
        "BACKUP_WEBHOOK_URL",
        "BACKUP_HEARTBEAT_URL",
        "BACKUP_LOG_FORMAT",
        "BACKUP_PGDATA",
        "DATABASE_URL",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
    }
)
# The runbook's own configuration names (Automated Backups section).
RUNBOOK_ENV = ("BACKUP_ENABLED", "BACKUP_S3_BUCKET", "BACKUP_RETENTION_DAYS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BACKUP_ENCRYPTION_PASSPHRASE", "DATABASE_URL")


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def load_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path) -> Any:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one document, got {len(docs)}"
    return docs[0]


def kustomization() -> dict[str, Any]:
    return load_one(K8S / "kustomization.yaml")  # type: ignore[no-any-return]


def core_manifests() -> list[Path]:
    return [K8S / name for name in kustomization()["resources"]]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in [*core_manifests(), K8S / "servicemonitor.yaml"]:
        for doc in load_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objs, f"duplicate {key}"
            objs[key] = doc
    return objs


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)


def test_expected_files_exist() -> None:
    for path in (COMPOSE, DOCKERFILE, ALERTS, DASHBOARD, K8S / "kustomization.yaml", K8S / "servicemonitor.yaml"):
        assert path.is_file(), path


def test_yaml_loader_rejects_broken_document() -> None:
    with pytest.raises(yaml.YAMLError):
        list(yaml.safe_load_all("a: [1, 2\nb: c\n---\nkind: x\n"))


# --------------------------------------------------------------------------- Kubernetes


def kv_validate(doc: dict[str, Any]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) ships the Kubernetes schemas")
    kv.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", [str(p.name) for p in core_manifests()])
def test_k8s_manifest_matches_kubernetes_schema(name: str) -> None:
    for doc in load_docs(K8S / name):
        kv_validate(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"].__setitem__("replicas", "two"),
        lambda d: pod_spec(d)["containers"][0].__setitem__("livenessProb", {}),
        lambda d: d.__setitem__("apiVersion", "apps/v0"),
    ],
    ids=["wrong-type", "unknown-field", "unknown-api-version"],
)
def test_k8s_validator_rejects_broken_manifest(mutate: Any) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    doc = load_one(K8S / "deployment.yaml")
    mutate(doc)
    with pytest.raises((kv.ValidationError, kv.SchemaNotFoundError)):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_core_file() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    assert k["namespace"] == NAMESPACE
    listed = set(k["resources"])
    assert len(listed) == len(k["resources"]), "duplicate resource"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The ServiceMonitor is a CRD: applied separately, only where the operator runs.
    assert "servicemonitor.yaml" not in listed
    assert listed == on_disk - {"servicemonitor.yaml"}
    for kind in ("Namespace", "Secret", "ConfigMap", "CronJob", "Deployment", "Service"):
        assert any(kind == o["kind"] for p in core_manifests() for o in load_docs(p)), kind


def test_everything_in_namespace_saveit() -> None:
    objs = k8s_objects()
    assert ("Namespace", NAMESPACE) in objs
    for (kind, name), obj in objs.items():
        if kind != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{kind}/{name}"


def test_cronjob_full_follows_runbook() -> None:
    cj = k8s_objects()[("CronJob", "saveit-backup-full")]
    assert cj["spec"]["schedule"] == RUNBOOK_FULL_SCHEDULE
    assert cj["spec"]["timeZone"] == "Etc/UTC"  # the runbook's 2 AM is UTC
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    cmd = [*pod_spec(cj)["containers"][0].get("command", []), *pod_spec(cj)["containers"][0].get("args", [])]
    assert cmd == ["saveit-backup", "backup", "--type", "full", "--remote"]


def test_cronjob_logical() -> None:
    cj = k8s_objects()[("CronJob", "saveit-backup-logical")]
    assert cj["spec"]["schedule"] == "0 3 * * *"
    cmd = [*pod_spec(cj)["containers"][0].get("command", []), *pod_spec(cj)["containers"][0].get("args", [])]
    assert cmd[:4] == ["saveit-backup", "backup", "--type", "logical"]


def test_deployment_serves_with_probes() -> None:
    dep = k8s_objects()[("Deployment", "saveit-backup")]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # never two schedulers
    (c,) = pod_spec(dep)["containers"]
    assert [*c.get("command", []), *c.get("args", [])] == ["saveit-backup", "serve"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert HTTP_PORT in ports.values()
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("livenessProbe", "readinessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert port in ports or port == HTTP_PORT
    # The CronJobs take full and logical backups; the service must not take them twice.
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("BACKUP_SCHEDULE_FULL") == ""
    assert env.get("BACKUP_SCHEDULE_LOGICAL") == ""


@pytest.mark.parametrize("key", [("Deployment", "saveit-backup"), ("CronJob", "saveit-backup-full"), ("CronJob", "saveit-backup-logical")])
def test_workload_security_and_resources(key: tuple[str, str]) -> None:
    obj = k8s_objects()[key]
    spec = pod_spec(obj)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec.get("automountServiceAccountToken") is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["memory"]
        assert c["resources"]["requests"]["cpu"]
        assert c["resources"]["limits"]["memory"] == "256Mi"
        refs = {(k, v["name"]) for e in c["envFrom"] for k, v in e.items()}
        assert refs == {("configMapRef", "saveit-backup-config"), ("secretRef", "saveit-backup-secrets")}
        if sc.get("readOnlyRootFilesystem"):
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes


def test_secret_and_configmap_use_known_names() -> None:
    objs = k8s_objects()
    secret = objs[("Secret", "saveit-backup-secrets")]
    assert "data" not in secret, "use stringData placeholders, not base64 data"
    assert set(SECRET_ENV) <= set(secret["stringData"])
    cm = objs[("ConfigMap", "saveit-backup-config")]["data"]
    assert all(isinstance(v, str) for v in cm.values())
    for name in [*secret["stringData"], *cm]:
        assert name in KNOWN_ENV, f"unknown environment variable {name}"
    assert not set(secret["stringData"]) & set(cm), "a value is both secret and not"
    for secret_name in SECRET_ENV:
        assert secret_name not in cm
    assert cm["BACKUP_SCHEDULE_FULL"] == RUNBOOK_FULL_SCHEDULE
    assert cm["BACKUP_S3_BUCKET"] == "saveit-backups"
    assert cm["BACKUP_RETENTION_DAYS"] == "30"
    assert cm["BACKUP_HTTP_PORT"] == str(HTTP_PORT)
    assert cm["BACKUP_HTTP_HOST"] == "0.0.0.0"  # the default 127.0.0.1 would fail the probes


def test_service_selects_only_the_deployment() -> None:
    objs = k8s_objects()
    svc = objs[("Service", "saveit-backup")]
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(HTTP_PORT)
    assert ann["prometheus.io/path"] == "/metrics"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == HTTP_PORT
    sel = svc["spec"]["selector"].items()
    assert sel <= pod_labels(objs[("Deployment", "saveit-backup")]).items()
    for name in ("saveit-backup-full", "saveit-backup-logical"):
        assert not sel <= pod_labels(objs[("CronJob", name)]).items(), f"Service would select CronJob {name} pods"


def test_servicemonitor_structure() -> None:
    objs = k8s_objects()
    sm = objs[("ServiceMonitor", "saveit-backup")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = objs[("Service", "saveit-backup")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["endpoints"]
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports
        assert ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", ep["interval"])


# --------------------------------------------------------------------------- docker compose


def compose_schema_errors(doc: Any) -> list[str]:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (dev extra) vendors the Compose specification schema")
    import jsonschema

    text = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_matches_compose_spec_schema() -> None:
    assert compose_schema_errors(load_one(COMPOSE)) == []


def test_compose_schema_rejects_broken_document() -> None:
    broken = yaml.safe_load(
        textwrap.dedent(
            """
            services:
              backup:
                image: saveit-backup
                restart: sometimes-maybe
                depends_on: {postgres: {condition: when-it-feels-like-it}}
                helthcheck: {test: ["CMD", "true"]}
            """
        )
    )
    errors = compose_schema_errors(broken)
    assert any("helthcheck" in e for e in errors), errors
    assert any("when-it-feels-like-it" in e for e in errors), errors


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_structure() -> None:
    doc = load_one(COMPOSE)
    services = doc["services"]
    assert {"postgres", "backup", "minio", "createbucket"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
    for name in ("postgres", "backup"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
        assert {"path": ".env", "required": False} in services[name]["env_file"]
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["createbucket"]["image"].startswith("minio/mc")
    assert "saveit-backups" in json.dumps(services["createbucket"])
    assert services["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"

    # Named volumes used by services are declared.
    declared = set(doc.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source} not declared"


def test_compose_postgres_archives_with_saveit() -> None:
    pg = load_one(COMPOSE)["services"]["postgres"]
    command = " ".join(pg["command"]) if isinstance(pg["command"], list) else pg["command"]
    assert "archive_mode=on" in command
    assert "archive_command=saveit-backup wal-push %p" in command
    assert "wal_level=replica" in command
    env = compose_env(pg)
    # The archiver inherits the server's environment: it needs the repository and keys.
    for name in ("BACKUP_REPOSITORY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert name in env, name


def test_compose_backup_service() -> None:
    doc = load_one(COMPOSE)
    backup = doc["services"]["backup"]
    assert backup["command"] == ["saveit-backup", "serve"]
    env = compose_env(backup)
    for name in env:
        if name.startswith(("BACKUP_", "AWS_", "PG")) or name == "DATABASE_URL":
            assert name in KNOWN_ENV, f"unknown environment variable {name}"
    for name in (*RUNBOOK_ENV, "BACKUP_REPOSITORY", "DATABASE_URL", "BACKUP_PGDATA", "BACKUP_HTTP_HOST", "BACKUP_RPO_SECONDS"):
        assert name in env, name
    assert "0 2 * * *" in env["BACKUP_SCHEDULE_FULL"]
    assert "saveit-backups" in env["BACKUP_S3_BUCKET"]
    # pgdata shared read-only, and BACKUP_PGDATA points inside it.
    pg_mount = next(v for v in doc["services"]["postgres"]["volumes"] if v.startswith("pgdata:"))
    ro_mount = next(v for v in backup["volumes"] if v.startswith("pgdata:"))
    assert ro_mount.endswith(":ro")
    assert ro_mount.split(":")[1] == pg_mount.split(":")[1]
    assert env["BACKUP_PGDATA"] == compose_env(doc["services"]["postgres"])["PGDATA"]
    assert env["BACKUP_PGDATA"].startswith(ro_mount.split(":")[1])
    assert any(str(HTTP_PORT) in str(p) for p in backup["ports"])
    # Secrets are interpolated from .env, never written literally.
    for name in ("AWS_SECRET_ACCESS_KEY", "BACKUP_ENCRYPTION_PASSPHRASE"):
        assert env[name].startswith("${" + name), name


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_problems(text: str) -> list[str]:
    ins = dockerfile_instructions(text)
    problems = []
    keywords = [k for k, _ in ins]
    if not ins or ins[0][0] != "FROM" or ins[0][1] != "postgres:15":
        problems.append("first instruction must be FROM postgres:15")
    users = [a for k, a in ins if k == "USER"]
    if not users or users[-1] in {"root", "0"}:
        problems.append("must end as a non-root USER")
    cmds = [a for k, a in ins if k == "CMD"]
    try:
        cmd = json.loads(cmds[-1]) if cmds else None
    except json.JSONDecodeError:
        cmd = None
    if cmd != ["saveit-backup", "serve"]:
        problems.append('CMD must be the exec form ["saveit-backup", "serve"]')
    checks = [a for k, a in ins if k == "HEALTHCHECK"]
    if not checks or "/health/live" not in checks[-1] or "python" not in checks[-1]:
        problems.append("HEALTHCHECK must probe /health/live with python")
    if "curl" in text:
        problems.append("no curl dependency")
    if "ENTRYPOINT" in keywords:
        problems.append("keep the postgres image's entrypoint")
    return problems


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text) == []
    ins = dockerfile_instructions(text)
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert "python3-venv" in runs
    assert "python3 -m venv /opt/saveit" in runs
    assert "/opt/saveit/bin/pip install /src" in runs
    # On PATH for the postgres user, including the archiver's (archive_command).
    assert "ln -s /opt/saveit/bin/saveit-backup /usr/local/bin/saveit-backup" in runs
    assert any(k == "ENV" and "/opt/saveit/bin" in a for k, a in ins)
    assert [a for k, a in ins if k == "USER"][-1] == "postgres"
    assert any(k == "EXPOSE" and str(HTTP_PORT) in a for k, a in ins)
    # Every COPY source exists (the build context is the repository root).
    for keyword, args in ins:
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    # The HEALTHCHECK's python is valid.
    check = [a for k, a in ins if k == "HEALTHCHECK"][-1]
    exec_form = json.loads(check[check.index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python3", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")


def test_dockerfile_checker_rejects_broken_dockerfile() -> None:
    broken = "FROM python:3.11\nRUN apt-get install -y curl\nHEALTHCHECK CMD curl -f http://localhost/\nCMD saveit-backup\n"
    problems = dockerfile_problems(broken)
    assert len(problems) >= 4, problems


# --------------------------------------------------------------------------- Prometheus rules


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (parsed with promql-parser when installed)."""
    try:
        import promql_parser
    except ImportError:  # fallback: names spelled like ours
        return set(re.findall(r"\bsaveit_[a-z_]+\b", expr))
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def rule_problems(doc: Any) -> list[str]:
    problems: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not doc["groups"]:
        return ["top level must be {groups: [...]}"]
    seen: set[str] = set()
    for group in doc["groups"]:
        if not group.get("name") or not group.get("rules"):
            problems.append(f"group {group!r} needs name and rules")
            continue
        for rule in group["rules"]:
            name = rule.get("alert")
            if not name:
                problems.append(f"rule without alert: {rule!r}")
                continue
            if name in seen:
                problems.append(f"{name}: duplicate")
            seen.add(name)
            extra = set(rule) - {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if extra:
                problems.append(f"{name}: unknown keys {sorted(extra)}")
            if not re.fullmatch(r"\d+[smhdwy]", str(rule.get("for", ""))):
                problems.append(f"{name}: needs for: DURATION")
            if rule.get("labels", {}).get("severity") not in {"critical", "warning", "info"}:
                problems.append(f"{name}: labels.severity must be critical, warning or info")
            ann = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                if not ann.get(key):
                    problems.append(f"{name}: annotations.{key} missing")
            try:
                unknown = promql_metric_names(str(rule.get("expr", ""))) - METRICS
            except ValueError as e:
                problems.append(f"{name}: expr does not parse: {e}")
                continue
            if unknown:
                problems.append(f"{name}: unknown metrics {sorted(unknown)}")
            if not rule.get("expr"):
                problems.append(f"{name}: expr missing")
    return problems


def alert_rules() -> dict[str, dict[str, Any]]:
    doc = load_one(ALERTS)
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_alert_rules_valid() -> None:
    pytest.importorskip("promql_parser", reason="promql-parser (dev extra) parses the expressions")
    assert rule_problems(load_one(ALERTS)) == []


def test_alert_rules_metric_names_without_parser() -> None:
    for name, rule in alert_rules().items():
        found = set(re.findall(r"\bsaveit_[a-z_]+\b", rule["expr"]))
        assert found, name
        assert found <= METRICS, (name, found - METRICS)


def test_rule_checker_rejects_broken_rules() -> None:
    pytest.importorskip("promql_parser")
    broken = {
        "groups": [
            {
                "name": "x",
                "rules": [
                    {"alert": "A", "expr": "sum(rate(saveit_backup_failures_total[5m])", "for": "5m", "labels": {"severity": "critical"}},
                    {"alert": "B", "expr": "up == 0", "labels": {"severity": "page"}, "annotations": {"summary": "s"}},
                    {"alert": "B", "expr": 'saveit_backup_last_size_byte{type="full"} > 0', "for": "soon"},
                ],
            }
        ]
    }
    problems = "\n".join(rule_problems(broken))
    assert "A: expr does not parse" in problems
    assert "unknown metrics ['up']" in problems
    assert "unknown metrics ['saveit_backup_last_size_byte']" in problems
    assert "B: duplicate" in problems
    assert "B: needs for" in problems
    assert "labels.severity" in problems
    assert "annotations.runbook_url missing" in problems


def test_required_alerts_present() -> None:
    rules = alert_rules()
    exprs = {name: " ".join(r["expr"].split()) for name, r in rules.items()}

    def find(*needles: str) -> list[str]:
        return [n for n, e in exprs.items() if all(x in e for x in needles)]

    assert find('saveit_backup_last_success_timestamp_seconds{type="full"}', "26 * 3600"), "no full backup in 26h"
    assert find("saveit_backup_last_success_timestamp_seconds", "incr", "2 * 3600"), "no incremental in 2h"
    assert find("saveit_wal_archive_lag_seconds > saveit_objective_rpo_seconds"), "WAL lag > RPO"
    assert find("saveit_restore_test_last_success == 0"), "restore test failing"
    assert find("35 * 86400"), "restore test older than 35 days"
    assert find("increase(saveit_backup_failures_total"), "failures increasing"
    assert find("saveit_wal_archive_queue_dropped_total"), "WAL queue drops"
    disabled = find("saveit_backup_enabled == 0")
    assert disabled
    assert rules[disabled[0]]["labels"]["severity"] == "info"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package: prometheus)")
def test_promtool_check_and_unit_test_rules(tmp_path: Path) -> None:
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # `check rules` above validated the annotation templates; compare labels only.
    rules = load_one(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(rules))
    lab = 'job="saveit-backup",instance="b:9187"'
    tests = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "1m",
        "tests": [
            {
                # Full backup at t=0, none after: fires once 26h + for: have passed.
                # Incrementals every minute; WAL lag above the RPO from 20h on.
                "interval": "1m",
                "input_series": [
                    {"series": f'saveit_backup_last_success_timestamp_seconds{{{lab},type="full"}}', "values": "0x1800"},
                    {"series": f'saveit_backup_last_success_timestamp_seconds{{{lab},type="incr"}}', "values": "0+60x1800"},
                    {"series": f'saveit_restore_test_last_timestamp_seconds{{{lab}}}', "values": "0x1800"},
                    {"series": f"saveit_backup_enabled{{{lab}}}", "values": "1x1800"},
                    {"series": f"saveit_wal_archive_lag_seconds{{{lab}}}", "values": "30x1200 7200x600"},
                    {"series": f"saveit_objective_rpo_seconds{{{lab}}}", "values": "3600x1800"},
                    {"series": f'saveit_backup_failures_total{{{lab},type="full"}}', "values": "0x1800"},
                ],
                "alert_rule_test": [
                    {"eval_time": "25h", "alertname": "SaveitFullBackupMissing", "exp_alerts": []},
                    {
                        "eval_time": "28h",
                        "alertname": "SaveitFullBackupMissing",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "service": "saveit-backup",
                                    "job": "saveit-backup",
                                    "instance": "b:9187",
                                    "type": "full",
                                }
                            }
                        ],
                    },
                    {"eval_time": "28h", "alertname": "SaveitIncrementalBackupMissing", "exp_alerts": []},
                    {"eval_time": "10h", "alertname": "SaveitWalArchiveLagAboveRpo", "exp_alerts": []},
                    {
                        "eval_time": "22h",
                        "alertname": "SaveitWalArchiveLagAboveRpo",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "service": "saveit-backup",
                                    "job": "saveit-backup",
                                    "instance": "b:9187",
                                }
                            }
                        ],
                    },
                    {"eval_time": "20h", "alertname": "SaveitBackupFailures", "exp_alerts": []},
                    {"eval_time": "20h", "alertname": "SaveitRestoreTestStale", "exp_alerts": []},
                    {"eval_time": "20h", "alertname": "SaveitBackupMetricsAbsent", "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


# --------------------------------------------------------------------------- Grafana


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


GRAFANA_VARS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")


def grafana_expr_problems(expr: str) -> list[str]:
    expr = GRAFANA_VARS.sub("5m", expr)
    try:
        unknown = promql_metric_names(expr) - METRICS
    except ValueError as e:
        return [f"does not parse: {e}"]
    return [f"unknown metrics {sorted(unknown)}"] if unknown else []


def test_dashboard_structure() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = all_panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert t["expr"].strip()


def test_dashboard_exprs_use_known_metrics() -> None:
    pytest.importorskip("promql_parser")
    d = dashboard()
    exprs = [t["expr"] for p in all_panels(d["panels"]) for t in p.get("targets", [])]
    problems = {e: grafana_expr_problems(e) for e in exprs}
    assert {e: p for e, p in problems.items() if p} == {}
    used = set().union(*(promql_metric_names(GRAFANA_VARS.sub("5m", e)) for e in exprs))
    assert used == METRICS, f"metrics missing from the dashboard: {sorted(METRICS - used)}"
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert set(re.findall(r"\bsaveit_[a-z_]+\b", v["definition"])) <= METRICS


def test_dashboard_covers_required_panels() -> None:
    text = json.dumps(dashboard())
    titles = " | ".join(p["title"].lower() for p in all_panels(dashboard()["panels"]))
    for needle in ("age", "duration", "size", "rpo", "pitr", "repository", "restore test", "rto", "failures"):
        assert needle in titles, needle
    assert "${DS_PROMETHEUS}" in text


def test_grafana_expr_checker_rejects_broken_exprs() -> None:
    pytest.importorskip("promql_parser")
    assert grafana_expr_problems("rate(saveit_backup_failures_total[$__rate_interval])") == []
    assert grafana_expr_problems("rate(saveit_backup_failures_total[$__rate_interval]") != []
    assert grafana_expr_problems("saveit_backup_last_size{type='full'}") == ["unknown metrics ['saveit_backup_last_size']"]
