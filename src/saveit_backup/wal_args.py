"""``wal-push`` / ``wal-fetch`` options parsed by hand, once, for every fast path.

PostgreSQL starts one process per WAL file: this module imports nothing beyond ``types`` (loaded
anyway) so that ``entry`` can parse the options before it decides what else to load.  It accepts
exactly what ``cli_wal``'s argparse definitions accept (which take their defaults from here) and
returns None for anything else, so argparse reports help and errors.
"""

from __future__ import annotations

from types import SimpleNamespace

TYPE_CHECKING = False  # typing is not loaded on this path; mypy still reads the block
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

# option -> (attribute, takes a value, converter); what quick_args cannot parse goes to argparse (cli_wal)
_OPTIONS: dict[str, dict[str, tuple[str, bool, Any]]] = {
    "wal-push": {"--async": ("async_", False, True), "--timeout": ("timeout", True, float)},
    "wal-fetch": {"--prefetch": ("prefetch", True, int), "--abort-on-error": ("abort_on_error", False, True)},
}
_COMMON = {"--config": ("wal_config", True, str), "--repo": ("wal_repo", True, str),
           "--verbose": ("wal_verbose", False, True), "-v": ("wal_verbose", False, True)}
DEFAULTS: dict[str, dict[str, Any]] = {"wal-push": {"async_": None, "timeout": 60.0},
                                        "wal-fetch": {"prefetch": 8, "abort_on_error": False}}
_POSITIONAL = {"wal-push": ("path",), "wal-fetch": ("name", "dest")}


_TRUE = ("1", "true", "yes", "on")  # as config.TRUE


def async_requested(args: SimpleNamespace | None, environ: Mapping[str, str]) -> bool:
    """Whether this ``wal-push`` asks for async mode before its configuration loads (``--async`` or
    BACKUP_ARCHIVE_ASYNC): only then can ``wal_spool.acknowledged`` answer it, so a sync push never
    imports the spool.  False for anything ``quick_args`` could not parse and for ``--verbose``."""
    if args is None or args.command != "wal-push" or args.wal_verbose:
        return False
    return bool(args.async_) or environ.get("BACKUP_ARCHIVE_ASYNC", "").strip().lower() in _TRUE


def quick_args(argv: Sequence[str]) -> SimpleNamespace | None:
    """Parse ``wal-push``/``wal-fetch`` arguments as argparse would; None for anything else (help, errors)."""
    command, rest = argv[0], list(argv[1:])
    options = {**_OPTIONS[command], **_COMMON}
    values: dict[str, Any] = {"command": command, "wal_config": None, "wal_repo": None, "wal_verbose": False,
                              **DEFAULTS[command]}
    positional: list[str] = []
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            positional += rest
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        flag, eq, inline = arg.partition("=")
        spec = options.get(flag)
        if spec is None:
            return None
        attr, takes_value, convert = spec
        if not takes_value:
            if eq:
                return None
            values[attr] = convert
            continue
        if not eq:
            if not rest:
                return None
            inline = rest.pop(0)
        try:
            values[attr] = convert(inline)
        except ValueError:
            return None
    names = _POSITIONAL[command]
    if len(positional) != len(names):
        return None
    values.update(zip(names, positional, strict=True))
    return SimpleNamespace(**values)
