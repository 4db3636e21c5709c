"""Attacks on the peer handshake (kvbm/daemon/peerauth.py) by someone who may send requests to the
daemon (a tenant's client holding the token) but does not hold the cluster's peer secret."""

from __future__ import annotations

import os

from kvbm.daemon.peerauth import MAX_CHALLENGES, Challenges, prove, server_ok

SECRET = b"p" * 32


def test_a_flood_of_first_steps_cannot_push_out_an_honest_peer_s_challenge():
    """Before: at most MAX_CHALLENGES challenges waited and the oldest went first, so anyone
    sending 256 first steps of peer_hello between an honest peer's two made its handshake fail
    (again and again: no peering). Now a challenge keeps its own state (MAC'd), issuing stores
    nothing, and the honest answer holds whatever came in between."""
    ch = Challenges(SECRET)
    nonce = os.urandom(32)
    challenge, proof = ch.issue(nonce)
    assert server_ok(SECRET, nonce, challenge, proof)
    for _ in range(10 * MAX_CHALLENGES):
        ch.issue(os.urandom(32))
    assert len(ch) == 0 and ch.spent == 0  # a flood stores nothing
    answer = prove(SECRET, b"puller", nonce, challenge)
    assert ch.check(nonce, challenge, answer)
    assert not ch.check(nonce, challenge, answer)  # still single-use


def test_stateless_challenges_hold_every_property_of_the_old_ones():
    now = [1000.0]
    ch = Challenges(SECRET, clock=lambda: now[0])
    nonce = os.urandom(32)
    challenge, proof = ch.issue(nonce)
    assert len(challenge) == 32 and not ch.check(nonce, challenge, proof)  # a reflected server proof
    # forged or altered challenges (the puller cannot make one that names another expiry or nonce)
    for i in range(32):
        bad = bytearray(challenge)
        bad[i] ^= 1
        assert not ch.check(nonce, bytes(bad), prove(SECRET, b"puller", nonce, bytes(bad)))
    assert not ch.check(os.urandom(32), challenge, prove(SECRET, b"puller", nonce, challenge))  # other nonce
    assert not ch.check(nonce, challenge, prove(b"q" * 32, b"puller", nonce, challenge))  # other secret
    # another daemon's (or an earlier run's) challenge, under the same secret, is not ours
    other, _ = Challenges(SECRET, clock=lambda: now[0]).issue(nonce)
    assert not ch.check(nonce, other, prove(SECRET, b"puller", nonce, other))
    now[0] += 31  # expired (CHALLENGE_TTL_S 30)
    assert not ch.check(nonce, challenge, prove(SECRET, b"puller", nonce, challenge))
    for bad in (None, b"", b"x" * 31, 7):
        assert not ch.check(nonce, bad, b"y" * 32)
    # spent challenges are bounded by honest handshakes and go once expired
    for _ in range(MAX_CHALLENGES + 10):
        n = os.urandom(32)
        c, _ = ch.issue(n)
        assert ch.check(n, c, prove(SECRET, b"puller", n, c))
    assert ch.spent <= MAX_CHALLENGES
    now[0] += 31
    n = os.urandom(32)
    c, _ = ch.issue(n)
    assert ch.check(n, c, prove(SECRET, b"puller", n, c)) and ch.spent == 1
