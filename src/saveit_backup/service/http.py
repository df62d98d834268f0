"""The service's HTTP endpoints (stdlib ThreadingHTTPServer).

* ``GET /health/live``: 200 while the process runs;
* ``GET /health/ready``: 200 when the repository and the database answer (503 otherwise);
  with BACKUP_ENABLED=false always 200, status "idle";
* ``GET /metrics``: Prometheus text exposition (service.metrics);
* ``GET /status``: JSON with ``Accept: application/json`` or ``?format=json``, else a small HTML page.
"""

from __future__ import annotations

import html
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from saveit_backup.errors import ConfigError

if TYPE_CHECKING:
    from saveit_backup.service.loops import Service

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, service: Service, host: str, port: int) -> None:
        from saveit_backup.service.metrics import build_registry

        self.service = service
        self.registry = build_registry(service.state)
        handler = type("Handler", (_Handler,), {"owner": self})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                              hint="set BACKUP_HTTP_HOST / BACKUP_HTTP_PORT to a free address") from None
        self.server.daemon_threads = True

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def serve(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: HttpServer
    server_version = "saveit-backup"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, body: Any) -> None:
        self._send(code, json.dumps(body, indent=1, default=str).encode(), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        service = self.owner.service
        try:
            if url.path == "/health/live":
                self._json(200, {"status": "alive", "enabled": bool(service.settings.enabled)})
            elif url.path == "/health/ready":
                ok, body = service.ready()
                self._json(200 if ok else 503, body)
            elif url.path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                from saveit_backup.service.metrics import exposition

                self._send(200, exposition(self.owner.registry), CONTENT_TYPE_LATEST)
            elif url.path == "/status":
                report = service.status()
                wants_json = ("application/json" in (self.headers.get("Accept") or "")
                              or parse_qs(url.query).get("format") == ["json"])
                if wants_json:
                    self._json(200, report)
                else:
                    self._send(200, render_html(report).encode(), "text/html; charset=utf-8")
            elif url.path == "/":
                self._send(200, b'<a href="/status">status</a> <a href="/metrics">metrics</a>\n', "text/html; charset=utf-8")
            else:
                self._json(404, {"error": "not found", "paths": ["/health/live", "/health/ready", "/metrics", "/status"]})
        except BrokenPipeError:
            pass
        except Exception as exc:
            log.exception("http %s failed", url.path)
            try:
                self._json(500, {"error": type(exc).__name__})
            except Exception:
                pass


def render_html(report: dict[str, Any]) -> str:
    from saveit_backup.ops.status import human_age

    e = html.escape
    rows = "".join(
        f"<tr><td>{e(kind)}</td><td>{e(b['id'])}</td><td>{e(human_age(b['age_seconds']))}</td>"
        f"<td>{b['stored_bytes']}</td><td>{b['duration_seconds']:.1f}</td></tr>"
        for kind, b in report["backups"].items())
    scheds = "".join(
        f"<tr><td>{e(job)}</td><td><code>{e(s['cron'] or '-')}</code></td>"
        f"<td>{e('disabled' if s.get('disabled') else ', '.join(s['next'][:2]) or '-')}</td></tr>"
        for job, s in report["schedules"].items())
    objs = "".join(
        f"<tr><td>{e(name.upper())}</td><td class='{e(o['status'])}'>{e(o['status'])}</td><td>{o['objective_seconds']}</td>"
        f"<td>{'-' if o['actual_seconds'] is None else o['actual_seconds']}</td><td>{e(str(o['detail']))}</td></tr>"
        for name, o in report["objectives"].items())
    svc = report.get("service") or {}
    enabled = "" if report["enabled"] else "<p><b>Scheduled backups are DISABLED (BACKUP_ENABLED=false): the service is idle.</b></p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>saveit-backup status</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}
.met{{color:green}}.breached{{color:#b00;font-weight:bold}}.unknown{{color:#888}}</style></head><body>
<h1>saveit-backup</h1>{enabled}
<p>repository {e(report['repository'])}: {report['backup_count']} backup(s), {report['repository_size_bytes']} bytes;
running: {e(str(svc.get('running') or '-'))}; generated {e(report['generated'])}</p>
<h2>Objectives</h2><table><tr><th></th><th>status</th><th>objective (s)</th><th>actual (s)</th><th></th></tr>{objs}</table>
<h2>Last backups</h2><table><tr><th>type</th><th>id</th><th>age</th><th>bytes</th><th>seconds</th></tr>{rows}</table>
<p>WAL lag {e(human_age(report['wal']['lag_seconds']))};
PITR window {e(str(report['pitr']['start']))} .. {e(str(report['pitr']['end']))}</p>
<h2>Schedules (UTC)</h2><table><tr><th>job</th><th>cron</th><th>next</th></tr>{scheds}</table>
</body></html>
"""
