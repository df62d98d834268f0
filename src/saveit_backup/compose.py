"""The one place that builds objects from configuration."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from saveit_backup.config import Settings
from saveit_backup.pipeline.crypto import Identity, Keyring, parse_public_key
from saveit_backup.pipeline.envelope import EncodeOptions
from saveit_backup.repo.repository import Repository
from saveit_backup.storage.base import Storage

if TYPE_CHECKING:
    from saveit_backup.storage.s3 import S3Options


def s3_options(settings: Settings) -> S3Options:
    from saveit_backup.storage.s3 import S3Options

    endpoint = settings.aws_endpoint_url or None
    return S3Options(
        endpoint_url=endpoint,
        region=settings.aws_region or None,
        access_key_id=settings.aws_access_key_id or None,
        secret_access_key=settings.aws_secret_access_key or None,
        session_token=settings.aws_session_token or None,
        path_style=settings.s3_path_style,
        allow_http=bool(endpoint and endpoint.startswith("http://")),
    )


def build_storage(settings: Settings, serial: bool = False) -> Storage:
    """``serial``: the caller makes one storage call at a time (a sync wal-push): no concurrency limit, whose
    semaphore would load ``threading`` (about 1 ms of every archive_command here)."""
    from saveit_backup.storage.registry import open_storage
    from saveit_backup.storage.wrappers import LimitedStorage, RetryingStorage

    url = settings.repository_url
    s3 = s3_options(settings) if url.startswith("s3://") else None
    inner = open_storage(url, s3)
    if serial:
        return RetryingStorage(inner)
    # Enough permits that no worker waits while holding what another needs: a diff/incr backup thread holds
    # its upload and, with page XOR, its reference's base stream (ops/incremental.py).
    return RetryingStorage(LimitedStorage(inner, max(4, settings.jobs * 2)))


def build_keyring(settings: Settings) -> Keyring:
    cache_dir = None
    if settings.encryption_passphrase:  # only passphrase slots derive a key to cache (an unencrypted wal-push loads nothing more)
        from saveit_backup.pipeline import kek_cache

        cache_dir = kek_cache.resolve(settings.key_cache_dir)
    return Keyring(
        passphrase=settings.encryption_passphrase or None,
        recipients=[parse_public_key(k) for k in settings.encryption_recipients],
        identities=[Identity.load(settings.encryption_identity)] if settings.encryption_identity else [],
        kek_cache_dir=cache_dir,
    )


def encode_options(settings: Settings) -> EncodeOptions:
    level = None if settings.compression_level < 0 else settings.compression_level
    return EncodeOptions(settings.compression, level, settings.compression_threads)


class Context:
    """What a command needs, built lazily from settings."""

    def __init__(self, settings: Settings, serial: bool = False) -> None:
        self.settings = settings
        self.serial = serial  # see build_storage

    @cached_property
    def storage(self) -> Storage:
        return build_storage(self.settings, self.serial)

    @cached_property
    def repo(self) -> Repository:
        return Repository(self.storage, build_keyring(self.settings), encode_options(self.settings))
