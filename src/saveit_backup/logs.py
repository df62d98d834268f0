"""Structured logs: one JSON object per line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(), "level": record.levelname.lower(),
                "logger": record.name, "msg": record.getMessage()}
        body.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k not in body})
        return json.dumps(body, default=str)


def setup(fmt: str, level: int, tag: str = "") -> None:
    """Route the package's logs to stderr, as text or one JSON object per line."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s", "%Y-%m-%dT%H:%M:%SZ"))
    root = logging.getLogger("saveit_backup")
    root.handlers[:] = [handler]
    root.setLevel(level)
