"""G2 keeps a block's crc32c once a peer pull computed or verified it (HostStorage.remember_crcs):
served again without checksumming, forgotten when the slot is reused, never vouching for other bytes.

    test_host_storage_forgets_a_crc_when_the_slot_is_handed_out   the storage's own rule
    test_served_twice_and_served_onward                           a -> b, a -> c, then b -> d (b's verified crcs)
    test_reused_slot_is_checksummed_again                          a's G2 slots reused by other keys: pulled right
"""

from __future__ import annotations

import numpy as np
import pytest

from daemonproc import HAVE_NIXL
from kvbm import ops
from kvbm.tiers.host import HostStorage
from servedaemon import NB, Served, block, make_keys, peer_secret


def test_host_storage_forgets_a_crc_when_the_slot_is_handed_out():
    st = HostStorage(4, NB, pin="never")
    try:
        slots = [st.allocate() for _ in range(3)]
        crcs, known = st.known_crcs(slots)
        assert not known.any() and not crcs.any()
        for s in slots:
            st.view(s)[:] = block(bytes([s]) * 16)
        real = ops.crc32c_blocks(st.pool, st.offsets(slots), NB)
        st.remember_crcs(slots, real)
        crcs, known = st.known_crcs(slots)
        assert known.all() and list(crcs) == list(real)
        # free one, allocate again (the same slot comes back): its checksum is gone
        st.free(slots[1])
        assert st.known_crcs(slots)[1].tolist() == [True, False, True]
        again = st.allocate()
        assert again == slots[1]
        assert st.known_crcs([again])[1].tolist() == [False]
        # a slot allocated fresh was never vouched for either
        last = st.allocate()
        assert st.known_crcs([last])[1].tolist() == [False]
        assert st.known_crcs(slots)[0].tolist() == [real[0], 0, real[2]]
    finally:
        st.close()


@pytest.fixture
def started(tmp_path):
    ds: list[Served] = []

    def start(name, g2=64, **daemon):
        daemon = {"nixl": True, "peer_secret_file": peer_secret(tmp_path), "address": "tcp://127.0.0.1:*",
                  "peer_timeout_s": 60.0, **daemon}
        tiers = [{"name": "g2", "capacity": g2, "eviction": "lru", "storage": "host"}]
        d = Served(tmp_path, name, tiers=tiers, daemon=daemon).start()
        ds.append(d)
        return d

    yield start
    for d in ds:
        d.stop()


def _pulled_right(d: Served, keys: list) -> dict:
    """d pulls keys (a miss there), loads them and checks every byte -> its daemon stats."""
    with d.client() as c:
        assert c.lookup(keys) == (len(keys), ["g2"] * len(keys))
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert c.load(keys, out) == len(keys)
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
        return c.stats()["daemon"]


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_served_twice_and_served_onward(started):
    a = started("a")
    keys = make_keys("twice", 12)
    with a.client() as ca:
        assert ca.store(keys, [block(k) for k in keys]) == 12
    b = started("b", peers=[a.address])
    st = _pulled_right(b, keys)
    assert st["peer_pull_blocks"] == 12 and st["peer_errors"] == 0
    with a.client() as ca:
        assert ca.stats()["daemon"]["peer_serve_crc_blocks"] == 12  # a checksummed the 12 blocks once
    c = started("c", peers=[a.address])
    st = _pulled_right(c, keys)  # a serves them again from its kept checksums
    assert st["peer_pull_blocks"] == 12 and st["peer_errors"] == 0
    with a.client() as ca:
        assert ca.stats()["daemon"]["peer_serve_crc_blocks"] == 12  # no second pass over the blocks
    d = started("d", peers=[b.address])
    st = _pulled_right(d, keys)  # b serves what it pulled, with the checksums it verified
    assert st["peer_pull_blocks"] == 12 and st["peer_errors"] == 0
    with b.client() as cb:
        assert cb.stats()["daemon"]["peer_serve_crc_blocks"] == 0


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_reused_slot_is_checksummed_again(started):
    a = started("a", g2=8)  # G2 only: storing 8 new blocks evicts the 8 old ones and reuses their slots
    old, new = make_keys("old", 8), make_keys("new", 8)
    with a.client() as ca:
        assert ca.store(old, [block(k) for k in old]) == 8
    b = started("b", peers=[a.address])
    assert _pulled_right(b, old)["peer_errors"] == 0  # a now keeps the old blocks' checksums
    with a.client() as ca:
        assert ca.store(new, [block(k) for k in new]) == 8
        assert ca.lookup(old, remote=False) == (0, [])  # evicted: every slot now holds a new block
        assert ca.stats()["daemon"]["peer_serve_crc_blocks"] == 8
    st = _pulled_right(b, new)  # a stale checksum would fail b's check (a miss), never pass wrong bytes
    assert st["peer_pull_blocks"] == 16 and st["peer_errors"] == 0
    with a.client() as ca:
        assert ca.stats()["daemon"]["peer_serve_crc_blocks"] == 16  # the new blocks were checksummed
