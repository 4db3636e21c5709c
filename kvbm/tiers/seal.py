"""The deployment secret, and what it seals: G4 object names and payloads.

    read_secret_file(path, what) -> bytes   a secret file's bytes; refused when group/others can read or write it
    object_secret(secret=, secret_file=)    the G4 secret: given, read from a file, or the per-user default
    cluster_object_secret(cluster_secret)   the G4 secret daemons of one cluster derive from their peer secret
    Seal(secret, namespace)                 one namespace's keys derived from the secret
    Seal.name(key) -> str                   the object name of a block key (keyed: unfindable without the secret)
    Seal.key_of(name) -> key | None         the block key back from a name; None for a foreign or forged name
    Seal.mac(key) -> hmac object            HMAC-SHA256 over namespace, key, payload and header fields (v2)
    Seal.one_time_key(key, context, nonce)  a Poly1305 key for one object (v3): never the same twice
    Seal.one_time_mac(key, context, nonce)  Poly1305 under that key (needs `cryptography`)
    Seal.seal_meta(key, blob) -> bytes      a block's opaque blob, sealed to its key (an object's trailer)
    Seal.open_meta(key, sealed) -> bytes | None  the blob back; None unless sealed for this key here
    poly1305_available() -> bool            whether `cryptography` is importable (else objects are v2)

And the G4 object header (object.py): its layout (HEADER, v2 / v3), _SealV2 / _SealV3 (a put's
MAC, fed chunk by chunk, then the header) and _Check (a get's verification: Corrupt or Foreign).

Names are a deterministic authenticated encryption of the key (SIV: a synthetic tag, then
the key XORed with a stream drawn from the tag), so recover() gets every key back from a
listing without reading an object, another deployment (another secret) can neither find our
blocks by their keys nor write under our names, and a listing shows no key in the clear
(a bucket reader cannot test whether a guessed prompt was cached). Each namespace derives its
own keys, so one namespace's names and MACs say nothing in another.

Payload MACs. Version 2 objects carry HMAC-SHA256 over the whole payload: ~0.75 s of CPU per
GiB here, the bound of G4 reads (issue 17). Version 3 objects carry a Poly1305 tag (~0.2 s/GiB,
OpenSSL via `cryptography`) under a one-time key: HMAC-SHA256(namespace's poly key, namespace,
header fields, a random 16-byte nonce, block key), ~1 us per object. The header fields hold the
payload's CRC-32C and length, so a writer that ever repeated a nonce (Poly1305's one weakness:
two tags under one key give the key away) would still key two different payloads differently
unless their CRCs collide too. Without the secret nobody derives a key; see SECURITY.md (G4).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any

from .. import ops

log = logging.getLogger(__name__)

TAG_BYTES = 16
MAC_BYTES = 32  # HMAC-SHA256 (v2 objects)
POLY_TAG_BYTES = 16  # Poly1305 (v3 objects)
NONCE_BYTES = 16
MIN_SECRET_BYTES = 16
DEFAULT_SECRET_NAME = "object.secret"


class SecretError(ValueError):
    """A secret file is missing, too short, or readable or writable by other users."""


def read_secret_file(path: str | os.PathLike, what: str) -> bytes:
    """The stripped bytes of a secret file that only its owner may read and write."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SecretError(f"{what}: cannot read {p}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"{what}: {p} is readable or writable by other users (mode "
                              f"{stat.S_IMODE(mode):04o}); run `chmod 600 {p}`")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read().strip()
    finally:
        os.close(fd)
    return data


def default_secret_file() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "kvbm" / DEFAULT_SECRET_NAME


def object_secret(secret: str | bytes | None = None, secret_file: str | os.PathLike | None = None) -> bytes:
    """The G4 secret: `secret`, else `secret_file`, else the per-user default file, made
    (32 random bytes, hex, 0600 in a 0700 folder) on first use."""
    if secret:
        data = secret.encode() if isinstance(secret, str) else bytes(secret)
        where = "object storage secret"
    else:
        where = f"object storage secret_file {secret_file}" if secret_file else "object storage secret"
        path = Path(secret_file) if secret_file else _default_or_error()
        data = read_secret_file(path, "object storage secret_file")
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(f"{where} holds {len(data)} bytes; use at least {MIN_SECRET_BYTES} random bytes "
                          f"(e.g. `head -c 32 /dev/urandom | xxd -p -c 64 > FILE; chmod 600 FILE`)")
    return data


def _default_or_error() -> Path:
    path = default_secret_file()
    try:
        return _ensure_default(path)
    except OSError as exc:
        raise SecretError(f"object storage: cannot make the default secret {path}: {exc.strerror}; set "
                          f"secret_file (tiers.g4.storage.secret_file) to a 0600 file of random bytes") from None


def _ensure_default(path: Path) -> Path:
    if path.exists():
        return path
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = folder / f".{DEFAULT_SECRET_NAME}.{os.getpid()}.{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.write(fd, os.urandom(32).hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces: two processes starting at once agree on one secret
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path


def cluster_object_secret(cluster_secret: bytes) -> bytes:
    """The G4 secret of daemons that share a cluster secret (daemon.peer_secret_file): one
    cluster, one G4; another cluster's objects are foreign. Hex, like a secret file's."""
    return hmac.new(cluster_secret, b"kvbm-g4-object-secret", hashlib.sha256).hexdigest().encode()


def _derive(secret: bytes, label: bytes, namespace: bytes) -> bytes:
    return hmac.new(secret, label + b"\0" + _field(namespace), hashlib.sha256).digest()


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


class Seal:
    """One namespace's object names and MACs under a deployment secret."""

    def __init__(self, secret: bytes, namespace: str) -> None:
        ns = namespace.encode()
        self.namespace = ns
        self._name_key = _derive(secret, b"kvbm-g4-name", ns)
        self._stream_key = _derive(secret, b"kvbm-g4-stream", ns)
        self._mac = hmac.new(_derive(secret, b"kvbm-g4-mac", ns), _field(ns), hashlib.sha256)
        self._otk = hmac.new(_derive(secret, b"kvbm-g4-poly1305", ns), _field(ns), hashlib.sha256)
        self._meta_key = _derive(secret, b"kvbm-g4-meta", ns)
        self._meta_stream = _derive(secret, b"kvbm-g4-meta-stream", ns)

    def name(self, key: Any) -> str:
        plain = _plain(key)
        tag = hmac.new(self._name_key, plain, hashlib.sha256).digest()[:TAG_BYTES]
        return (tag + _xor(plain, self._stream(tag, len(plain)))).hex()

    def key_of(self, name: str) -> Any:
        try:
            raw = bytes.fromhex(name)
        except ValueError:
            return None
        if len(raw) < TAG_BYTES + 1:
            return None
        tag, sealed = raw[:TAG_BYTES], raw[TAG_BYTES:]
        plain = _xor(sealed, self._stream(tag, len(sealed)))
        if not hmac.compare_digest(hmac.new(self._name_key, plain, hashlib.sha256).digest()[:TAG_BYTES], tag):
            return None
        return _key(plain)

    def mac(self, key: Any) -> "hmac.HMAC":
        """A running MAC over namespace and key: feed it the payload, then the (fixed-size)
        header fields, then digest()."""
        m = self._mac.copy()
        m.update(_field(_plain(key)))
        return m

    def one_time_key(self, key: Any, context: bytes, nonce: bytes) -> bytes:
        """The 32-byte Poly1305 key of one object: keyed by the namespace's secret, over the
        header fields (`context`: version, lengths, CRC-32C), the object's nonce and the block
        key, each length-prefixed. Another key, header or nonce gives an unrelated key."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a one-time key needs a {NONCE_BYTES}-byte nonce, got {len(nonce)}")
        m = self._otk.copy()
        m.update(_field(bytes(context)) + _field(bytes(nonce)) + _field(_plain(key)))
        return m.digest()

    def one_time_mac(self, key: Any, context: bytes, nonce: bytes) -> Any:
        """Poly1305 under one_time_key(): feed it the payload, then the header, then
        finalize() (writer) or verify(tag) (reader). ImportError without `cryptography`."""
        return _poly1305()(self.one_time_key(key, context, nonce))

    def _stream(self, tag: bytes, n: int) -> bytes:
        return hashlib.shake_256(self._stream_key + tag).digest(n)

    def seal_meta(self, key: Any, blob: bytes) -> bytes:
        """A block's blob as an object keeps it (object_meta.py): sealed as names are (SIV: a
        16-byte tag over namespace, key and blob, then the blob XORed with a stream drawn from
        the tag), so a bucket reader learns nothing of it and only this namespace's key opens it."""
        tag = self._meta_tag(key, blob)
        return tag + _xor(blob, hashlib.shake_256(self._meta_stream + tag).digest(len(blob)))

    def open_meta(self, key: Any, sealed: bytes) -> bytes | None:
        """The blob seal_meta(key, ...) sealed; None for one sealed for another key, another
        namespace or another secret, or altered in any bit."""
        if len(sealed) < TAG_BYTES:
            return None
        tag, body = bytes(sealed[:TAG_BYTES]), bytes(sealed[TAG_BYTES:])
        blob = _xor(body, hashlib.shake_256(self._meta_stream + tag).digest(len(body)))
        return blob if hmac.compare_digest(self._meta_tag(key, blob), tag) else None

    def _meta_tag(self, key: Any, blob: bytes) -> bytes:
        m = hmac.new(self._meta_key, _field(self.namespace) + _field(_plain(key)) + _field(blob), hashlib.sha256)
        return m.digest()[:TAG_BYTES]


@functools.cache
def _poly1305() -> Any:
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    return Poly1305


def poly1305_available() -> bool:
    """Whether v3 objects can be written and verified here (`cryptography` importable)."""
    try:
        _poly1305()
    except ImportError:
        return False
    return True


def _plain(key: Any) -> bytes:
    if isinstance(key, bytes):
        return b"\x00" + key
    if isinstance(key, int) and not isinstance(key, bool):
        return b"\x01" + str(key).encode()
    raise TypeError(f"persistent storages need bytes or int block keys, got {type(key).__name__}")


def _key(plain: bytes) -> Any:
    if plain[:1] == b"\x00":
        return plain[1:]
    if plain[:1] == b"\x01":
        try:
            return int(plain[1:].decode("ascii"))
        except ValueError:
            return None
    return None


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


# ---------------------------------------------------------------- object headers (G4, object.py)

MAGIC = b"KVB4"
VERSION = 3  # Poly1305 under a one-time key (needs `cryptography`)
HMAC_VERSION = 2  # HMAC-SHA256: written without `cryptography`, read always
# magic, version, MAC length, CRC-32C of the payload, block_nbytes; then (v2) the MAC, or (v3)
# the nonce, zero bytes and the tag; zero-padded so that every object of a layout has one size
# (HEADER_MIN + block_nbytes) and the payload starts 64 bytes in. One size lets puts reuse
# their bodies and lets recover() spot torn objects.
HEADER = struct.Struct("<4sHHIQ")
HEADER_MIN = 64
NONCE_AT = HEADER.size  # v3: 20..36 nonce, 36..48 zero, 48..64 tag
TAG_AT = HEADER_MIN - POLY_TAG_BYTES
MAC_LEN = {HMAC_VERSION: MAC_BYTES, VERSION: POLY_TAG_BYTES}


class Corrupt(Exception):
    """The object exists but is not this block (header, length or CRC mismatch)."""


class Foreign(Corrupt):
    """Header and CRC hold but the MAC does not: another deployment's object, or a forgery."""


class _SealV2:
    """A v2 put: CRC-32C and HMAC-SHA256 fed chunk by chunk, then the header."""

    def __init__(self, mac: Any, nbytes: int) -> None:
        self.crc, self.mac, self.nbytes = 0, mac, nbytes

    def update(self, piece: memoryview) -> None:
        self.crc = ops.crc32c(piece, self.crc)
        self.mac.update(piece)

    def header(self) -> bytes:
        """Fields, then the MAC (fed the fields last, after the payload), zero-padded."""
        fields = HEADER.pack(MAGIC, HMAC_VERSION, MAC_BYTES, self.crc, self.nbytes)
        self.mac.update(fields)
        return (fields + self.mac.digest()).ljust(HEADER_MIN, b"\0")


class _SealV3:
    """A v3 put: the CRC-32C first (it keys the tag), a fresh nonce, then Poly1305 fed chunk by
    chunk and the header bytes before the tag last."""

    def __init__(self, seal: Seal, key: Any, data: memoryview) -> None:
        fields = HEADER.pack(MAGIC, VERSION, POLY_TAG_BYTES, ops.crc32c(data), len(data))
        self.head = (fields + _nonce()).ljust(TAG_AT, b"\0")
        self.mac = seal.one_time_mac(key, fields, self.head[NONCE_AT:NONCE_AT + NONCE_BYTES])

    def update(self, piece: memoryview) -> None:
        self.mac.update(piece)

    def header(self) -> bytes:
        self.mac.update(self.head)
        return self.head + self.mac.finalize()


class _Check:
    """A get: the payload's MAC (and, v2, its CRC-32C) fed chunk by chunk; verify(payload)
    raises Corrupt when the CRC fails, Foreign when the CRC holds and the MAC does not.

    v3 computes the CRC only when the tag fails, to tell a damaged object from a foreign one:
    a tag that holds authenticates the payload and the header's CRC of it together, so the
    CRC can only agree (saves ~0.1 s of CPU per GiB read)."""

    def __init__(self, path: str, head: bytes, mac: Any) -> None:
        self.path, self.head, self.mac, self.crc = path, head, mac, 0
        self.v2 = HEADER.unpack_from(head)[1] == HMAC_VERSION

    def update(self, piece: memoryview) -> None:
        if self.v2:
            self.crc = ops.crc32c(piece, self.crc)
        self.mac.update(piece)

    def verify(self, payload: memoryview) -> None:
        crc = HEADER.unpack_from(self.head)[3]
        if self.v2:
            if crc != self.crc:
                raise Corrupt(f"{self.path}: CRC-32C mismatch")
            self.mac.update(self.head[:HEADER.size])
            if hmac.compare_digest(self.mac.digest(), self.head[HEADER.size:HEADER.size + MAC_BYTES]):
                return
        else:  # v3: the tag covers the payload and every header byte before it (nonce, zeros)
            self.mac.update(self.head[:TAG_AT])
            try:
                self.mac.verify(self.head[TAG_AT:])
                return
            except Exception:  # cryptography.exceptions.InvalidSignature
                if ops.crc32c(payload) != crc:
                    raise Corrupt(f"{self.path}: CRC-32C mismatch") from None
        raise Foreign(f"{self.path}: valid CRC but no valid MAC: not this deployment's block")


def _nonce() -> bytes:
    """A v3 object's nonce: 16 bytes from the kernel's CSPRNG (getrandom: fork-safe), never a
    counter, never given by a caller."""
    return os.urandom(NONCE_BYTES)


@functools.cache
def _warn_no_poly1305() -> None:
    log.warning("object storage: v3 (Poly1305) objects are misses here: install `cryptography` "
                "(pip install 'kvbm-tiered[s3]') to read them")
