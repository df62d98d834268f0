"""One error tree with stable codes.

Every user-facing failure is a ``SaveitError``: a stable ``code`` (never reused),
an ``exit_status`` for the process, a one-line message naming the cause, and a
``hint`` naming the fix.  ``str(err)`` is the single line printed to the user.
Messages must never contain passwords or keys.
"""

from __future__ import annotations


class SaveitError(Exception):
    """Base of all expected failures."""

    code = "SVB-000"
    exit_status = 1
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint, "kind": type(self).__name__}


# --- usage and configuration (exit 2) --------------------------------------------
class ConfigError(SaveitError):
    code = "SVB-100"
    exit_status = 2
    default_hint = "check the command line, environment variables and config file (saveit-backup config show)"


# --- repository (exit 3, 4) ------------------------------------------------------
class RepositoryNotInitialized(SaveitError):
    code = "SVB-200"
    exit_status = 3
    default_hint = "run 'saveit-backup repo init' or check --repo / BACKUP_REPOSITORY"


class RepositoryFormatError(SaveitError):
    code = "SVB-201"
    exit_status = 3
    default_hint = "upgrade saveit-backup to a version that supports this repository format"


class LockHeld(SaveitError):
    code = "SVB-210"
    exit_status = 4
    default_hint = "another saveit-backup job holds the repository lock; wait for it to finish"


# --- storage (exit 5..8) ---------------------------------------------------------
class StorageError(SaveitError):
    code = "SVB-300"
    exit_status = 5


class NotFound(StorageError):
    code = "SVB-301"
    exit_status = 5
    default_hint = "check the repository URL and that the object or bucket exists"


class AlreadyExists(StorageError):
    code = "SVB-302"
    exit_status = 5
    default_hint = "objects are write-once; this name is already taken"


class BucketNotFound(StorageError):
    code = "SVB-303"
    exit_status = 5
    default_hint = "create the bucket first or fix BACKUP_S3_BUCKET / BACKUP_REPOSITORY"


class AccessDenied(StorageError):
    code = "SVB-310"
    exit_status = 6
    default_hint = "check file permissions of the repository, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"


class TransientStorageError(StorageError):
    code = "SVB-320"
    exit_status = 7
    default_hint = "the storage is unreachable or timed out; check network connectivity and AWS_ENDPOINT_URL, then retry"


class PermanentStorageError(StorageError):
    code = "SVB-330"
    exit_status = 5
    default_hint = "the storage rejected the request; check the repository settings"


class NoSpace(StorageError):
    code = "SVB-340"
    exit_status = 8
    default_hint = "free disk space on the repository volume or run 'saveit-backup expire'"


# --- integrity and encryption (exit 9, 10) ---------------------------------------
class IntegrityError(SaveitError):
    code = "SVB-400"
    exit_status = 9
    default_hint = "the stored data is damaged; run 'saveit-backup verify --all' and restore from another backup"


class DecryptionError(SaveitError):
    code = "SVB-410"
    exit_status = 10
    default_hint = "set the right BACKUP_ENCRYPTION_PASSPHRASE or BACKUP_ENCRYPTION_IDENTITY"


class EncryptionConfigError(SaveitError):
    code = "SVB-411"
    exit_status = 10
    default_hint = "set BACKUP_ENCRYPTION_PASSPHRASE or BACKUP_ENCRYPTION_RECIPIENTS as the repository requires"


# --- PostgreSQL (exit 11, 12) ----------------------------------------------------
class DatabaseUnreachable(SaveitError):
    code = "SVB-500"
    exit_status = 11
    default_hint = "check --dbname / DATABASE_URL / PGHOST, PGPORT, PGUSER and that the server is running"


class PgToolError(SaveitError):
    code = "SVB-510"
    exit_status = 12
    default_hint = "read the PostgreSQL tool's message above; check the connection and permissions"


class PgVersionMismatch(SaveitError):
    code = "SVB-511"
    exit_status = 12
    default_hint = "install PostgreSQL client tools at least as new as the server, or set BACKUP_PG_BINDIR"


# --- backups and restore (exit 13..16) -------------------------------------------
class BackupNotFound(SaveitError):
    code = "SVB-600"
    exit_status = 13
    default_hint = "run 'saveit-backup list' to see the backups in the repository"


class RestoreRefused(SaveitError):
    code = "SVB-610"
    exit_status = 14
    default_hint = "choose an empty target or pass --clean if replacing its contents is intended"


class RestoreMismatch(SaveitError):
    code = "SVB-620"
    exit_status = 15
    default_hint = "the restored data differs from the backup manifest; inspect the comparison above"


class WalMismatch(SaveitError):
    code = "SVB-700"
    exit_status = 16
    default_hint = "a different WAL segment with this name is already archived; check for two clusters archiving into one repository"


class WalNotFound(SaveitError):
    """Not an error for recovery: wal-fetch exits 1 so PostgreSQL ends recovery."""

    code = "SVB-701"
    exit_status = 1
    default_hint = ""


class Interrupted(SaveitError):
    code = "SVB-900"
    exit_status = 130
    default_hint = "the job was interrupted; nothing half-finished is visible"
