"""Client-side encryption: AES-256-GCM frames under a per-object data key.

Each object gets a random 256-bit data key.  The plaintext (after
compression) is cut into frames of ``FRAME_SIZE`` bytes; frame *i* is sealed
with nonce = i (8 bytes, big-endian) || final flag (4 bytes) and the object
header as associated data, so frames cannot be reordered, truncated,
extended or moved to another header.  Every non-final frame is exactly
``FRAME_SIZE + 16`` bytes on disk and the final frame is shorter: a reader
tells the final frame by its length.

The data key is wrapped once per key slot:

* ``passphrase``: KEK = scrypt(passphrase, salt, n, r, p) (parameters in the
  slot; derived once per process, and kept between processes by ``kek_cache``);
* ``x25519``: KEK = HKDF-SHA256(X25519(ephemeral, recipient), salt =
  ephemeral_pub || recipient_pub), so a host holding only public keys can
  write backups it cannot read.

See docs/format.md for the byte layout.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any, NamedTuple

from saveit_backup.errors import ConfigError, DecryptionError, IntegrityError

FRAME_SIZE = 1 << 20
TAG_SIZE = 16
PUBLIC_PREFIX = "saveit-pub-"
SECRET_PREFIX = "SAVEIT-SECRET-KEY-"
SCRYPT_PARAMS = {"n": 1 << 15, "r": 8, "p": 1}
_SLOT_AAD = b"saveit-backup key slot v1"
_HKDF_INFO = b"saveit-backup x25519 v1"


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


@lru_cache(maxsize=8)
def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int, cache_dir: str | None = None) -> bytes:
    """The KEK of a passphrase slot; ``cache_dir``: see ``kek_cache`` (None: not cached between processes)."""
    from saveit_backup.pipeline import kek_cache

    kek = kek_cache.load(cache_dir, passphrase, salt, n, r, p) if cache_dir else None
    if kek is None:
        import hashlib  # loads OpenSSL (3 ms): only when deriving

        kek = hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 << 20, dklen=32)
        if cache_dir:
            kek_cache.store(cache_dir, passphrase, salt, n, r, p, kek)
    return kek


# --- keys -----------------------------------------------------------------------
def public_key_text(raw: bytes) -> str:
    return PUBLIC_PREFIX + b64e(raw)


def parse_public_key(text: str) -> bytes:
    text = text.strip()
    if not text.startswith(PUBLIC_PREFIX):
        raise ConfigError(f"not a saveit-backup public key: {text[:24]!r}",
                          hint="use the key printed by 'saveit-backup key generate'")
    raw = b64d(text[len(PUBLIC_PREFIX) :])
    if len(raw) != 32:
        raise ConfigError("public key has the wrong length", hint="use the key printed by 'saveit-backup key generate'")
    return raw


def fingerprint(public_raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_identity() -> tuple[str, str]:
    """Return (identity file text, public key text)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    key = X25519PrivateKey.generate()
    secret = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = public_key_text(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    text = (f"# saveit-backup identity (private key: keep it away from the database host)\n"
            f"# public key: {public}\n{SECRET_PREFIX}{b64e(secret)}\n")
    return text, public


class Identity(NamedTuple):
    secret: bytes
    public: bytes

    @classmethod
    def load(cls, path: str) -> Identity:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read identity file {path}: {exc.strerror}", hint="check BACKUP_ENCRYPTION_IDENTITY") from exc
        for line in text.splitlines():
            if line.startswith(SECRET_PREFIX):
                secret = b64d(line[len(SECRET_PREFIX) :].strip())
                public = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                return cls(secret, public)
        raise ConfigError(f"{path} holds no {SECRET_PREFIX} line", hint="use a file written by 'saveit-backup key generate'")


class Keyring:
    """The keys this process holds: what it may write with and read with."""

    def __init__(self, passphrase: str | None = None, recipients: list[bytes] | None = None,
                 identities: list[Identity] | None = None, scrypt_salt: bytes | None = None,
                 kek_cache_dir: str | None = None) -> None:
        self.passphrase = passphrase
        self.recipients = recipients or []  # X25519 public keys
        self.identities = identities or []
        self.scrypt_salt = scrypt_salt  # repository-wide salt: one scrypt per process
        self.kek_cache_dir = kek_cache_dir  # and, cached there, one per host (kek_cache)

    def __repr__(self) -> str:  # never the secrets
        return f"Keyring({self.describe()}, {len(self.identities)} identities)"

    @property
    def can_read(self) -> bool:
        return bool(self.passphrase or self.identities)

    @property
    def can_write_encrypted(self) -> bool:
        return bool(self.passphrase or self.recipients)

    def describe(self) -> str:
        parts = []
        if self.passphrase:
            parts.append("passphrase")
        if self.recipients:
            parts.append(f"{len(self.recipients)} recipient(s)")
        return " + ".join(parts) or "none"

    def wrap(self, data_key: bytes) -> list[dict[str, Any]]:
        slots: list[dict[str, Any]] = []
        if self.passphrase:
            salt = self.scrypt_salt or os.urandom(16)
            p = SCRYPT_PARAMS
            kek = _scrypt(self.passphrase, salt, p["n"], p["r"], p["p"], self.kek_cache_dir)
            nonce = os.urandom(12)
            slots.append(
                {"type": "passphrase", "kdf": "scrypt", "salt": b64e(salt), **p, "nonce": b64e(nonce),
                 "wrapped": b64e(_aesgcm(kek).encrypt(nonce, data_key, _SLOT_AAD))}
            )
        for recipient in self.recipients:
            eph_pub, kek = _x25519_send(recipient)
            nonce = os.urandom(12)
            slots.append(
                {"type": "x25519", "recipient": fingerprint(recipient), "epk": b64e(eph_pub), "nonce": b64e(nonce),
                 "wrapped": b64e(_aesgcm(kek).encrypt(nonce, data_key, _SLOT_AAD))}
            )
        return slots

    def unwrap(self, slots: list[dict[str, Any]], what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        tried = []
        for slot in slots:
            try:
                if slot["type"] == "passphrase" and self.passphrase:
                    tried.append("passphrase")
                    if slot.get("kdf") != "scrypt":
                        raise IntegrityError(f"{what}: unsupported key derivation {slot.get('kdf')!r}")
                    kek = _scrypt(self.passphrase, b64d(slot["salt"]), int(slot["n"]), int(slot["r"]), int(slot["p"]),
                                  self.kek_cache_dir)
                elif slot["type"] == "x25519":
                    match = [i for i in self.identities if fingerprint(i.public) == slot["recipient"]]
                    if not match:
                        continue
                    tried.append(f"identity {slot['recipient']}")
                    kek = _x25519_receive(match[0], b64d(slot["epk"]))
                else:
                    continue
                key: bytes = _aesgcm(kek).decrypt(b64d(slot["nonce"]), b64d(slot["wrapped"]), _SLOT_AAD)
                return key
            except InvalidTag:
                continue
        kinds = sorted({s["type"] for s in slots})
        if tried:
            raise DecryptionError(
                f"{what}: the configured key ({', '.join(tried)}) does not open this object (encrypted for {', '.join(kinds)})")
        raise DecryptionError(f"{what} is encrypted (for {', '.join(kinds)}) but no matching key is configured")


# The X25519 and serialization modules cost about 20 ms to import: loaded only for recipient slots
# (a passphrase-only wal-push never needs them).
def _x25519_send(recipient: bytes) -> tuple[bytes, bytes]:
    """(ephemeral public key, KEK) for a new slot to ``recipient``."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return eph_pub, _x25519_kek(eph.exchange(X25519PublicKey.from_public_bytes(recipient)), eph_pub, recipient)


def _x25519_receive(ident: Identity, eph_pub: bytes) -> bytes:
    """The KEK of a slot made for ``ident`` with the ephemeral public key ``eph_pub``."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    shared = X25519PrivateKey.from_private_bytes(ident.secret).exchange(X25519PublicKey.from_public_bytes(eph_pub))
    return _x25519_kek(shared, eph_pub, ident.public)


def _x25519_kek(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if shared == bytes(32):
        raise DecryptionError("invalid X25519 share (all-zero)")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=_HKDF_INFO).derive(shared)


def _nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(8, "big") + (b"\x00\x00\x00\x01" if final else b"\x00\x00\x00\x00")


def encrypt_frames(chunks: Iterable[bytes], data_key: bytes, aad: bytes, frame_size: int = FRAME_SIZE) -> Iterator[bytes]:
    aead = _aesgcm(data_key)
    buf = bytearray()
    counter = 0
    for chunk in chunks:
        buf += chunk
        # Keep at least one byte back: the final frame must be shorter than a full frame.
        while len(buf) > frame_size:
            yield aead.encrypt(_nonce(counter, False), bytes(buf[:frame_size]), aad)
            del buf[:frame_size]
            counter += 1
    if len(buf) == frame_size:
        yield aead.encrypt(_nonce(counter, False), bytes(buf), aad)
        counter += 1
        buf.clear()
    yield aead.encrypt(_nonce(counter, True), bytes(buf), aad)


def encrypt_buffer(data: bytes | memoryview, data_key: bytes, aad: bytes, frame_size: int = FRAME_SIZE) -> list[bytes]:
    """``encrypt_frames`` of bytes already in memory: each frame sealed straight from ``data``, no copies."""
    aead = _aesgcm(data_key)
    last = len(data) // frame_size  # the final frame is shorter than a full one: maybe empty
    with memoryview(data) as view:
        sealed = [aead.encrypt(_nonce(i, False), view[i * frame_size : (i + 1) * frame_size], aad) for i in range(last)]
        sealed.append(aead.encrypt(_nonce(last, True), view[last * frame_size :], aad))
    return sealed


def decrypt_frames(chunks: Iterator[bytes], data_key: bytes, aad: bytes, what: str, frame_size: int = FRAME_SIZE) -> Iterator[bytes]:
    from cryptography.exceptions import InvalidTag

    aead = _aesgcm(data_key)
    full = frame_size + TAG_SIZE
    buf = bytearray()
    counter = 0
    for chunk in chunks:
        buf += chunk
        while len(buf) > full:
            try:
                yield aead.decrypt(_nonce(counter, False), bytes(buf[:full]), aad)
            except InvalidTag:
                raise IntegrityError(f"{what}: encrypted frame {counter} fails authentication (corrupt or tampered)") from None
            del buf[:full]
            counter += 1
    # What remains is one full non-final frame followed by nothing (truncated), or the final frame.
    if len(buf) == full:
        raise IntegrityError(f"{what}: encrypted stream is truncated after frame {counter}")
    if len(buf) < TAG_SIZE:
        raise IntegrityError(f"{what}: encrypted stream is truncated")
    try:
        yield aead.decrypt(_nonce(counter, True), bytes(buf), aad)
    except InvalidTag:
        raise IntegrityError(f"{what}: final encrypted frame fails authentication (corrupt or truncated)") from None
