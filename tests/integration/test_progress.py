"""Progress bars appear on a terminal only: bytes, rate and ETA; nothing with --quiet, --json or a pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import pytest

from tests.fixtures.pg import CLI, Database, cli_for

pytestmark = pytest.mark.pg


def run_on_tty(args: list[str], env: dict[str, str]) -> str:
    """Run with stderr on a pseudo-terminal; return what the terminal showed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal has a size
    proc = subprocess.Popen([CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        shown += data
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    return shown.decode(errors="replace")


def test_progress_bar_on_terminal_only(runbook_db: Database, repo_dir: Path) -> None:
    cli = cli_for(runbook_db, f"file://{repo_dir}")
    shown = run_on_tty(["backup"], cli.env)
    assert "dump " in shown and "B/s" in shown and "%" in shown  # bytes, rate, and a fraction with ETA
    assert "dump " not in run_on_tty(["--quiet", "backup"], cli.env)
    assert "dump " not in run_on_tty(["--json", "backup"], cli.env)
    piped = cli("backup")  # not a terminal: no bar
    assert "B/s" not in piped.stderr
