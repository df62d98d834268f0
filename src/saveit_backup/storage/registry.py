"""The one place that maps repository URLs to storage backends.

* ``file:///abs/path`` or a plain path (no ``scheme://``) -> ``LocalStorage``
* ``s3://bucket[/prefix]`` -> ``S3Storage`` (settings from ``S3Options``)
* ``memory://[name]`` -> one shared ``MemoryStorage`` per name in this process
* ``gs://``, ``az://`` -> ``ConfigError`` (not supported yet)

Backends are imported only when their scheme is used, so a ``file://``
repository never loads obstore.
"""

from __future__ import annotations

import _thread
import os
from typing import TYPE_CHECKING

from saveit_backup.errors import ConfigError
from saveit_backup.storage.base import Storage

if TYPE_CHECKING:
    from saveit_backup.storage.memory import MemoryStorage
    from saveit_backup.storage.s3 import S3Options

_memory_stores: dict[str, MemoryStorage] = {}
_memory_lock = _thread.allocate_lock()  # threading.Lock itself, without loading threading (wal-push's path)

_NOT_YET = {
    "gs": "Google Cloud Storage",
    "gcs": "Google Cloud Storage",
    "az": "Azure Blob Storage",
    "azure": "Azure Blob Storage",
    "abfs": "Azure Blob Storage",
}
_SUPPORTED = "file:///path, a plain path, s3://bucket/prefix or memory://"


def url_scheme(url: str) -> str:
    """The backend a repository URL names: its scheme, lower case; ``file`` for a plain path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def open_storage(url: str, s3: S3Options | None = None) -> Storage:
    """Build the backend for ``url``; raise ``ConfigError`` for unusable URLs."""
    if not url:
        raise ConfigError("empty repository URL", hint=f"use {_SUPPORTED}")
    scheme = url_scheme(url)
    if "://" not in url:
        return _local(url)
    if scheme == "file":
        return _local(_file_path(url))
    if scheme == "s3":
        return _s3(url, s3)
    if scheme == "memory":
        return _memory(url.split("://", 1)[1])
    if scheme in _NOT_YET:
        raise ConfigError(
            f"repository URL scheme {scheme}:// ({_NOT_YET[scheme]}) is not supported yet",
            hint=f"use {_SUPPORTED}; an S3-compatible gateway in front of the store works with s3://",
        )
    raise ConfigError(f"unknown repository URL scheme {scheme}://", hint=f"use {_SUPPORTED}")


def _file_path(url: str) -> str:
    rest = url.split("://", 1)[1]
    if any(c in rest for c in "%?#"):  # quoting, query or fragment: let urllib decide (not wal-push's common path)
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url)
        host, path = parts.netloc, unquote(parts.path)
    else:
        host, slash, tail = rest.partition("/")
        path = slash + tail
    if host not in ("", "localhost"):
        raise ConfigError(
            f"file URL {url!r} names a host; only local paths are supported",
            hint="write file:///absolute/path (three slashes)",
        )
    if not path.startswith("/"):
        raise ConfigError(f"file URL {url!r} is not absolute", hint="write file:///absolute/path")
    return path


def _local(path: str) -> Storage:
    from saveit_backup.storage.local import LocalStorage

    return LocalStorage(os.path.abspath(os.path.expanduser(path)))


def _s3(url: str, options: S3Options | None) -> Storage:
    from urllib.parse import unquote, urlsplit

    from saveit_backup.storage.s3 import S3Options, S3Storage

    parts = urlsplit(url)
    bucket = parts.netloc
    if not bucket or "@" in bucket:
        raise ConfigError(
            "S3 repository URL needs a bucket name",
            hint="write s3://bucket/optional/prefix; credentials belong in the S3 settings, not the URL",
        )
    prefix = unquote(parts.path).strip("/")
    return S3Storage(bucket, prefix, options or S3Options())


def _memory(name: str) -> Storage:
    from saveit_backup.storage.memory import MemoryStorage

    name = name.strip("/")
    with _memory_lock:
        store = _memory_stores.get(name)
        if store is None:
            store = _memory_stores[name] = MemoryStorage()
        return store
