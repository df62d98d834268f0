"""Command group registered by cli.py."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this group's parsers to ``sub``."""
