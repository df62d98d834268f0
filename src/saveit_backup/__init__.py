"""saveit-backup: PostgreSQL backup and restore."""

__version__ = "0.1.0"
