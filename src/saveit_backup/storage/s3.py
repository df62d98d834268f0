"""S3 backend on obstore (Rust object_store).

Contract notes beyond ``storage.base``:

* Everything comes from ``S3Options``; this module reads no environment
  variable itself (obstore still falls back to ``AWS_*`` variables for fields
  left ``None``, e.g. the credential chain).
* ``put`` streams iterables as a multipart upload of ``part_size`` parts with up
  to ``max_parallel_parts`` in flight: memory is about
  ``part_size * (max_parallel_parts + 1)``.  A failing iterable aborts the
  upload, so nothing becomes visible.
* ``put(if_absent=True)`` is server-enforced: up to one part it is a
  conditional PUT (``If-None-Match: *``); larger streams go to a hidden temp
  key (``.<name>.<uuid>.tmp-saveit``, never listed) and are then copied with
  copy-if-not-exists (multipart copy completed with ``If-None-Match``) and the
  temp key deleted.
* obstore retries connection errors and 5xx itself (``max_retries`` 3, bounded
  by ``timeout_seconds``); what still fails is classified here and never
  retried again by this module.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)

from saveit_backup.errors import (
    AccessDenied,
    AlreadyExists,
    BucketNotFound,
    ConfigError,
    NotFound,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from saveit_backup.storage.base import CHUNK_SIZE, TMP_SUFFIX, Capabilities, Data, ObjectInfo, check_key, iter_chunks

if TYPE_CHECKING:
    from obstore.store import S3Store

MiB = 1 << 20
_MIN_PART_SIZE = 5 * MiB  # S3 minimum for every part but the last
_TMP_SUFFIX = TMP_SUFFIX
_MAX_REQUEST_SECONDS = 12 * 3600  # overall cap per request; long streamed GETs must fit


@dataclass(frozen=True)
class S3Options:
    """Connection settings for S3 and S3-compatible stores.

    ``allow_http`` left ``None`` resolves to True exactly when ``endpoint_url``
    starts with ``http://``.  Secrets are excluded from ``repr``.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    path_style: bool = False
    allow_http: bool | None = None
    part_size: int = 16 * MiB
    max_parallel_parts: int = 4
    timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.allow_http is None:
            resolved = bool(self.endpoint_url and self.endpoint_url.lower().startswith("http://"))
            object.__setattr__(self, "allow_http", resolved)
        if self.part_size < _MIN_PART_SIZE:
            raise ConfigError(f"S3 part size {self.part_size} is below the S3 minimum of 5 MiB")
        if self.max_parallel_parts < 1:
            raise ConfigError("S3 max parallel parts must be at least 1")
        if self.timeout_seconds <= 0:
            raise ConfigError("S3 timeout must be positive")


# --- error classification ----------------------------------------------------------

_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_TRANSIENT_WORDS = ("error sending request", "timed out", "timeout", "connection", "connect", "dns", "broken pipe")
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}


def _summary(text: str, status: int | None, code: str | None) -> str:
    """A short cause: ``HTTP 403 SignatureDoesNotMatch`` or ``error sending request, after 3 retries``."""
    if status is not None:
        return f"HTTP {status}" + (f" {code}" if code else "")
    first = text.splitlines()[0].strip() if text.strip() else "unknown error"
    cause = first.rsplit(" - ", 1)[-1].strip()
    cause = re.sub(r"^(HTTP error|Generic S3 error):\s*", "", cause)
    retries = re.search(r"after (\d+) retries", first)
    if retries:
        cause += f", after {retries.group(1)} retries"
    # Never echo URLs: a presigned query string would carry a signature.
    return re.sub(r"https?://\S+", "<url>", cause)[:200]


def classify_error(exc: BaseException, what: str) -> StorageError:
    """Map an obstore/builtin exception to the storage error tree (one-line message)."""
    text = str(exc)
    match = _STATUS_RE.search(text)
    status = int(match.group(1)) if match else None
    code_match = _CODE_RE.search(text)
    code = code_match.group(1) if code_match else None
    brief = _summary(text, status, code)
    lowered = text.lower()

    if code == "NoSuchBucket":
        return BucketNotFound(f"{what}: bucket does not exist ({brief})")
    if isinstance(exc, (AlreadyExistsError, PreconditionError)):
        return AlreadyExists(f"{what}: already exists")
    if isinstance(exc, FileNotFoundError) or status == 404:
        return NotFound(f"{what}: not found")
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403) or code in _AUTH_CODES:
        return AccessDenied(f"{what}: access denied ({brief})")
    if "builder error" in lowered:  # e.g. an http:// endpoint without allow_http
        return PermanentStorageError(f"{what}: cannot build the request ({brief}); check endpoint URL and allow_http")
    if status is not None:
        if status >= 500 or status in (408, 429):
            return TransientStorageError(f"{what}: server error ({brief})")
        return PermanentStorageError(f"{what}: request rejected ({brief})")
    if isinstance(exc, (TimeoutError, ConnectionError)) or any(word in lowered for word in _TRANSIENT_WORDS):
        return TransientStorageError(f"{what}: endpoint unreachable or timed out ({brief})")
    return PermanentStorageError(f"{what}: {brief}")


def _is_obstore_error(exc: BaseException) -> bool:
    # obstore raises its own BaseError subclasses plus a few builtins
    # (FileNotFoundError, ValueError for bad ranges/config).
    return isinstance(exc, (obstore.exceptions.BaseError, FileNotFoundError, TimeoutError, ConnectionError))


# --- the backend -------------------------------------------------------------------


class S3Storage:
    """``Storage`` on one bucket and optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        from obstore.store import S3Store

        self.options = options or S3Options()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        opts = self.options
        config: dict[str, Any] = {
            "virtual_hosted_style_request": not opts.path_style,
            "copy_if_not_exists": "multipart",
        }
        for name, value in (
            ("endpoint", opts.endpoint_url),
            ("region", opts.region),
            ("access_key_id", opts.access_key_id),
            ("secret_access_key", opts.secret_access_key),
            ("session_token", opts.session_token),
        ):
            if value is not None:
                config[name] = value
        timeout = timedelta(seconds=opts.timeout_seconds)
        # Passing client_options replaces every env-derived client option: set all we need.
        client_options: dict[str, Any] = {
            "allow_http": bool(opts.allow_http),
            "connect_timeout": timedelta(seconds=min(5.0, opts.timeout_seconds)),
            "read_timeout": timeout,  # a stalled connection fails after this long without data
            "timeout": timedelta(seconds=max(_MAX_REQUEST_SECONDS, opts.timeout_seconds)),
        }
        retry_config: dict[str, Any] = {
            "max_retries": 3,
            "retry_timeout": timeout,
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        }
        try:
            self._store: S3Store = S3Store(
                bucket,
                prefix=self.prefix or None,
                config=config,  # type: ignore[arg-type]
                client_options=client_options,  # type: ignore[arg-type]
                retry_config=retry_config,  # type: ignore[arg-type]
            )
        except Exception as exc:  # builder errors: bad endpoint, unknown region syntax...
            raise ConfigError(f"invalid S3 settings for bucket {bucket}: {_summary(str(exc), None, None)}") from exc
        location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.capabilities = Capabilities(atomic_if_absent=True, url=location)

    def __repr__(self) -> str:
        return f"S3Storage({self.capabilities.url!r})"

    def _what(self, verb: str, key: str) -> str:
        return f"{verb} {key} in {self.capabilities.url}"

    # -- put --------------------------------------------------------------------------

    def put(self, key: str, data: Data, *, if_absent: bool = False) -> None:
        check_key(key)
        part_size = self.options.part_size
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) <= part_size:
            self._put_single(key, bytes(data), if_absent)
            return
        chunks = iter_chunks(data)
        head: list[bytes] = []
        buffered = 0
        for chunk in chunks:
            head.append(chunk)
            buffered += len(chunk)
            if buffered > part_size:
                break
        else:  # the whole stream fits in one part: a single (conditional) PUT
            self._put_single(key, b"".join(head), if_absent)
            return
        stream = itertools.chain(head, chunks)
        if not if_absent:
            self._put_multipart(key, stream)
            return
        # Write-once for big streams: upload hidden, then server-side copy-if-not-exists.
        directory, _, name = key.rpartition("/")
        tmp = f"{directory}/" if directory else ""
        tmp += f".{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            self._put_multipart(tmp, stream)
            try:
                obstore.copy(self._store, tmp, key, overwrite=False)
            except Exception as exc:
                if _is_obstore_error(exc):
                    raise classify_error(exc, self._what("writing", key)) from exc
                raise
        finally:
            with contextlib.suppress(Exception):  # best effort; the temp key is hidden from list
                obstore.delete(self._store, tmp)

    def _put_single(self, key: str, body: bytes, if_absent: bool) -> None:
        try:
            obstore.put(
                self._store,
                key,
                body,
                mode="create" if if_absent else "overwrite",
                use_multipart=False,
            )
        except Exception as exc:
            if _is_obstore_error(exc):
                raise classify_error(exc, self._what("writing", key)) from exc
            raise

    def _put_multipart(self, key: str, stream: Iterator[bytes]) -> None:
        # Exceptions raised by the caller's iterable propagate unchanged (upload aborted).
        try:
            obstore.put(
                self._store,
                key,
                stream,
                use_multipart=True,
                chunk_size=self.options.part_size,
                max_concurrency=self.options.max_parallel_parts,
            )
        except Exception as exc:
            if _is_obstore_error(exc):
                raise classify_error(exc, self._what("writing", key)) from exc
            raise

    # -- reads ------------------------------------------------------------------------

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Start the GET now (so NotFound raises here); stream the body lazily."""
        check_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ConfigError(f"invalid byte range offset={offset} length={length}")
        if length == 0:
            self.stat(key)  # still report a missing key
            return iter(())
        options: dict[str, Any] = {}
        if length is not None:
            options["range"] = (offset, offset + length)
        elif offset:
            options["range"] = {"offset": offset}
        try:
            result = obstore.get(self._store, key, options=options or None)  # type: ignore[arg-type]
        except Exception as exc:
            if not _is_obstore_error(exc):
                raise
            status = _STATUS_RE.search(str(exc))
            if status and status.group(1) == "416":
                self.stat(key)  # offset at or past the end: empty, like a file read
                return iter(())
            raise classify_error(exc, self._what("reading", key)) from exc
        return self._stream(key, result.stream(min_chunk_size=CHUNK_SIZE))

    def _stream(self, key: str, stream: Iterator[bytes]) -> Iterator[bytes]:
        while True:
            try:
                chunk = next(stream)
            except StopIteration:
                return
            except Exception as exc:
                if _is_obstore_error(exc):
                    raise classify_error(exc, self._what("reading", key)) from exc
                raise
            if chunk:
                yield bytes(chunk)

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        try:
            meta = obstore.head(self._store, key)
        except Exception as exc:
            if _is_obstore_error(exc):
                raise classify_error(exc, self._what("stat", key)) from exc
            raise
        return ObjectInfo(key, int(meta["size"]), meta["last_modified"].timestamp())

    def list(self, prefix: str = "", *, hidden: bool = False) -> Iterator[ObjectInfo]:
        """Keys starting with ``prefix`` (plain string prefix, not only whole path segments)."""
        # object_store lists whole path segments: ask for the enclosing directory and filter.
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        found: list[ObjectInfo] = []
        try:
            for batch in obstore.list(self._store, directory or None, chunk_size=1000):
                for meta in batch:
                    path = meta["path"]
                    if not path.startswith(prefix) or (path.endswith(_TMP_SUFFIX) and not hidden):
                        continue
                    found.append(ObjectInfo(path, int(meta["size"]), meta["last_modified"].timestamp()))
        except Exception as exc:
            if _is_obstore_error(exc):
                raise classify_error(exc, self._what("listing", prefix or "/")) from exc
            raise
        found.sort(key=lambda info: info.key)
        return iter(found)

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            obstore.delete(self._store, key)
        except Exception as exc:
            if not _is_obstore_error(exc):
                raise
            error = classify_error(exc, self._what("deleting", key))
            if type(error) is NotFound:  # already gone: fine (a missing bucket is not)
                return
            raise error from exc
