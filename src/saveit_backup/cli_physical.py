"""Physical backups, physical restore and WAL continuity reports (issue: physical backups)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from saveit_backup.errors import ConfigError

if TYPE_CHECKING:
    from saveit_backup.compose import Context
    from saveit_backup.domain.manifest import Manifest
    from saveit_backup.ops.progress import Progress


def register(sub: Any) -> None:
    """Physical options are on the shared backup/restore parsers; nothing extra yet."""


def physical_backup(args: argparse.Namespace, ctx: Context, progress: Progress) -> Manifest:
    raise ConfigError(f"backup --type {args.type} is not available in this build", hint="use --type logical")


def physical_restore(args: argparse.Namespace, ctx: Context, progress: Progress) -> int:
    raise ConfigError("restore --target-dir is not available in this build", hint="use --target-db")


def wal_report(ctx: Context, manifests: list[Manifest]) -> dict[str, Any]:
    return {"lines": [], "problems": []}
