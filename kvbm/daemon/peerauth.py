"""Peer daemons prove to each other that they hold the cluster's peer secret.

    load_secret(path) -> bytes              daemon.peer_secret_file: >= 16 bytes, not readable by others
    prove(secret, role, nonce, challenge)   HMAC-SHA256 over both nonces, one label per direction
    Challenges(secret)                      the serving side's single-use, stateless, expiring challenges
    Challenges.issue(nonce) -> (challenge, proof)     step 1 of peer_hello: we prove ourselves first
    Challenges.check(nonce, challenge, proof) -> bool step 2: the puller proves itself
    server_ok(secret, nonce, challenge, proof)        the puller's check of step 1

The handshake (both directions, so neither side talks to an impostor):

    puller  -> server   peer_hello {nonce: 32 random bytes}
    server  -> puller   {challenge: 32 random bytes, proof: HMAC(K, "server" | nonce | challenge)}
    puller checks the server's proof, then
    puller  -> server   peer_hello {nonce, challenge, proof: HMAC(K, "puller" | nonce | challenge)}
    server  -> puller   {session, agent, metadata}     only now: the NIXL metadata names our G2 pool

The secret K is separate from the client token: a client (which knows the token, or nothing on
a loopback bind) cannot open a peer session, so it can never ask for another namespace's
addresses. The labels keep a proof from being reflected back as the other side's; a challenge is
used once and expires after CHALLENGE_TTL_S; it carries its own state (MAC'd), so a flood of first
steps costs no memory and cannot push out an honest peer's challenge (Challenges). The session id that follows is a bearer secret on
the link, like the token; the link itself is not encrypted (see SECURITY.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict

from ..config import ConfigError
from ..tiers.seal import SecretError, read_secret_file

NONCE_BYTES = 32
MIN_SECRET_BYTES = 16
CHALLENGE_TTL_S = 30.0
MAX_CHALLENGES = 256
_LABEL = b"kvbm-peer-hello/1/"


def load_secret(path: str) -> bytes:
    """The peer secret in `path`; ConfigError (one line, naming the file) when it cannot be read,
    others may read or write it, or it is too short to be a secret."""
    try:
        secret = read_secret_file(path, "daemon.peer_secret_file")
    except SecretError as exc:
        raise ConfigError(str(exc)) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"daemon.peer_secret_file: {path} holds {len(secret)} bytes; use at least "
                          f"{MIN_SECRET_BYTES} random ones (e.g. `head -c 32 /dev/urandom | base64 > {path}`)")
    return secret


def prove(secret: bytes, role: bytes, nonce: bytes, challenge: bytes) -> bytes:
    """What `role` (b"server" or b"puller") sends to show it holds `secret`."""
    return hmac.new(secret, _LABEL + role + b"\0" + nonce + challenge, hashlib.sha256).digest()


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def server_ok(secret: bytes, our_nonce: bytes, challenge: object, proof: object) -> bool:
    """The puller's check of the server's first answer: it holds the secret too."""
    return (isinstance(challenge, bytes) and len(challenge) == NONCE_BYTES and isinstance(proof, bytes)
            and hmac.compare_digest(prove(secret, b"server", our_nonce, challenge), proof))


class Challenges:
    """The serving side of the handshake. A challenge carries its own state: 8 random bytes, its
    expiry (ms on this daemon's clock) and a MAC over both and the puller's nonce, under a key
    derived from the secret; so issuing one stores nothing, and a flood of first steps (anyone
    who may send requests, e.g. a tenant's client with the token) can no longer push out the
    challenge an honest peer is about to answer (before: at most MAX_CHALLENGES waited, the
    oldest went first, so 256 first steps between a peer's two made its handshake fail). What is
    stored is the challenges answered with a valid proof (only a holder of the secret makes one),
    until they expire: each is accepted once."""

    def __init__(self, secret: bytes, clock=time.monotonic) -> None:
        self._secret = secret
        # (a per-process salt: a challenge of an earlier daemon, whose spent set is gone, is not ours)
        self._key = hmac.new(secret, _LABEL + b"challenge" + os.urandom(16), hashlib.sha256).digest()
        self._clock = clock
        self._spent: OrderedDict[bytes, float] = OrderedDict()  # answered challenge -> expiry

    def __len__(self) -> int:
        """Challenges stored waiting for an answer: none (each carries its own state)."""
        return 0

    @property
    def spent(self) -> int:
        """Answered challenges remembered until they expire (at most MAX_CHALLENGES)."""
        return len(self._spent)

    def issue(self, their_nonce: bytes) -> tuple[bytes, bytes]:
        expiry_ms = int((self._clock() + CHALLENGE_TTL_S) * 1000)
        head = os.urandom(8) + expiry_ms.to_bytes(8, "big", signed=True)
        challenge = head + self._mac(their_nonce, head)
        return challenge, prove(self._secret, b"server", their_nonce, challenge)

    def check(self, their_nonce: bytes, challenge: bytes, proof: bytes) -> bool:
        """True once per issued challenge answered with the right proof (then it is spent)."""
        if not (isinstance(challenge, bytes) and len(challenge) == NONCE_BYTES and isinstance(their_nonce, bytes)
                and isinstance(proof, bytes)):
            return False
        head, tag = challenge[:16], challenge[16:]
        if not hmac.compare_digest(self._mac(their_nonce, head), tag):
            return False  # not issued here, or issued for another nonce
        now = self._clock()
        expiry = int.from_bytes(head[8:], "big", signed=True) / 1000
        if expiry < now or challenge in self._spent:
            return False
        if not hmac.compare_digest(prove(self._secret, b"puller", their_nonce, challenge), proof):
            return False
        while self._spent and (len(self._spent) >= MAX_CHALLENGES or next(iter(self._spent.values())) < now):
            self._spent.popitem(last=False)
        self._spent[challenge] = expiry
        return True

    def _mac(self, their_nonce: bytes, head: bytes) -> bytes:
        return hmac.new(self._key, bytes(their_nonce) + head, hashlib.sha256).digest()[:NONCE_BYTES - 16]
