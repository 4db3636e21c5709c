"""G4 objects bound to the deployment (its secret) and the namespace: two deployments sharing
one prefix never load or overwrite each other's blocks, and a forged object with a valid header
and CRC-32C is a counted miss. Plus the secret's own rules (file mode, length, default)."""

from __future__ import annotations

import os
import stat
import struct
import uuid

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvbm import BlockManager, KVBMConfig, KVLayout
from kvbm.config import ConfigError
from kvbm.demo import block_content
from kvbm.ops import crc32c
from kvbm.tiers.object import HEADER, HEADER_MIN, HMAC_VERSION, MAGIC, VERSION, ObjectStorage
from kvbm.tiers.seal import MAC_BYTES, NONCE_BYTES, POLY_TAG_BYTES, Seal, SecretError, default_secret_file, object_secret

KiB = 1024
A, B = b"a" * 32, b"b" * 32  # two deployments' secrets


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://kvbm-{uuid.uuid4().hex[:8]}"
    return f"file://{tmp_path}/g4"


def blocks(n: int, nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, nbytes), dtype=np.uint8)


def store(g4, keys, data):
    slots = [g4.allocate() for _ in keys]
    assert g4.write(list(zip(keys, slots, data))) == [True] * len(keys)
    return slots


def load(g4, keys, slots):
    out = np.zeros((len(keys), g4.block_nbytes), dtype=np.uint8)
    return g4.read(list(zip(keys, slots, out))), out


def objects(g4) -> list[str]:
    g4.fs.invalidate_cache(g4.prefix)
    return sorted(p for p in g4.fs.find(g4.prefix))


def test_two_secrets_on_one_prefix_never_load_or_overwrite_each_other(url):
    keys = [b"\x01" * 16, 7, b"\x02" * 16]
    a = ObjectStorage(8, 4 * KiB, namespace="ns", url=url, secret=A)
    b = ObjectStorage(8, 4 * KiB, namespace="ns", url=url, secret=B)
    da, db = blocks(3, 4 * KiB, 1), blocks(3, 4 * KiB, 2)
    sa = store(a, keys, da)
    # b looks the same keys up: other names, so nothing is found; nothing to recover either,
    # and a's three objects in the listing are counted as foreign
    assert load(b, keys, [b.allocate() for _ in keys])[0] == [False] * 3
    assert b.recover() == [] and b.errors.foreign_objects == 3
    # b stores the same keys: its own names, a's objects untouched
    sb = store(b, keys, db)
    assert len(objects(a)) == 6
    ok, out = load(a, keys, sa)
    assert ok == [True] * 3 and np.array_equal(out, da)
    ok, out = load(b, keys, sb[:3])
    assert ok == [True] * 3 and np.array_equal(out, db)
    # a restarted a recovers its own three, and counts b's three as foreign
    again = ObjectStorage(8, 4 * KiB, namespace="ns", url=url, secret=A)
    assert sorted(map(repr, (k for k, _ in again.recover()))) == sorted(map(repr, keys))
    assert again.errors.foreign_objects == 3
    # b frees its blocks: only its own objects go
    for s in sb:
        b.free(s)
    b.close()
    assert len(objects(a)) == 3
    assert load(a, keys, sa)[0] == [True] * 3


def forge(g4, key, payload: np.ndarray, mac: bytes, version: int = HMAC_VERSION) -> None:
    """A header a CRC check accepts (magic, version, size, CRC-32C of the payload), any MAC
    (v2: 32 bytes after the fields; v3: 16-byte nonce + 16-byte tag, placed at the end)."""
    mac_len = MAC_BYTES if version == HMAC_VERSION else POLY_TAG_BYTES
    fields = HEADER.pack(MAGIC, version, mac_len, crc32c(payload), payload.nbytes)
    if version == HMAC_VERSION:
        head = (fields + mac).ljust(HEADER_MIN, b"\0")
    else:
        head = (fields + mac[:NONCE_BYTES]).ljust(HEADER_MIN - POLY_TAG_BYTES, b"\0") + mac[NONCE_BYTES:]
    g4.fs.pipe_file(g4.path_of(key), head + payload.tobytes())


def test_a_forged_object_with_a_valid_crc_is_a_counted_miss(url):
    g4 = ObjectStorage(4, 4 * KiB, namespace="ns", url=url, secret=A)
    key, evil = b"\x05" * 16, blocks(1, 4 * KiB, 9)[0]
    (slot,) = store(g4, [key], blocks(1, 4 * KiB, 3))
    forge(g4, key, evil, bytes(MAC_BYTES))
    ok, out = load(g4, [key], [slot])
    assert ok == [False]
    assert (g4.errors.checksum_errors, g4.errors.foreign_objects, g4.errors.io_errors) == (1, 1, 0)
    # the MAC of another deployment (it knows the key, not our secret) fails the same way
    other = Seal(B, "ns").mac(key)
    other.update(evil.tobytes())
    other.update(HEADER.pack(MAGIC, HMAC_VERSION, MAC_BYTES, crc32c(evil), evil.nbytes))
    forge(g4, key, evil, other.digest())
    assert load(g4, [key], [slot])[0] == [False] and g4.errors.foreign_objects == 2
    # the same as v3: a random nonce and tag, then a real Poly1305 tag under B's one-time key
    forge(g4, key, evil, os.urandom(32), VERSION)
    assert load(g4, [key], [slot])[0] == [False] and g4.errors.foreign_objects == 3
    nonce = os.urandom(NONCE_BYTES)
    fields = HEADER.pack(MAGIC, VERSION, POLY_TAG_BYTES, crc32c(evil), evil.nbytes)
    tag = Seal(B, "ns").one_time_mac(key, fields, nonce)
    tag.update(evil.tobytes())
    tag.update((fields + nonce).ljust(HEADER_MIN - POLY_TAG_BYTES, b"\0"))
    forge(g4, key, evil, nonce + tag.finalize(), VERSION)
    assert load(g4, [key], [slot])[0] == [False] and g4.errors.foreign_objects == 4
    # a valid object of ours for another key, copied under this key's name: also a miss
    (s2,) = store(g4, [99], blocks(1, 4 * KiB, 4))
    g4.fs.pipe_file(g4.path_of(key), g4.fs.cat_file(g4.path_of(99)))
    assert load(g4, [key, 99], [slot, s2])[0] == [False, True] and g4.errors.foreign_objects == 5


def test_one_secret_two_namespaces_never_share_a_name_or_a_mac(url):
    a = ObjectStorage(4, 4 * KiB, namespace="model-a--f00", url=url, secret=A)
    b = ObjectStorage(4, 4 * KiB, namespace="model-b--f00", url=url, secret=A)
    key = b"\x03" * 16
    assert a.path_of(key).rsplit("/", 1)[1] != b.path_of(key).rsplit("/", 1)[1]
    store(a, [key], blocks(1, 4 * KiB, 5))
    # moved into b's folder under b's name for the key: b's MAC key differs, so a miss
    b.fs.pipe_file(b.path_of(key), a.fs.cat_file(a.path_of(key)))
    assert load(b, [key], [b.allocate()])[0] == [False] and b.errors.foreign_objects == 1


def test_an_object_from_before_the_mac_is_a_miss(tmp_path):
    url = f"file://{tmp_path}/g4"
    g4 = ObjectStorage(4, 4 * KiB, namespace="ns", url=url, secret=A)
    payload = blocks(1, 4 * KiB, 6)[0]
    # version 1: the key's name in the header, no MAC, under the key's plain name
    old = struct.pack("<4sHHIQ", MAGIC, 1, 2, crc32c(payload), payload.nbytes) + b"i5"
    g4.fs.pipe_file(f"{g4.prefix}/i5", old.ljust(HEADER_MIN, b"\0") + payload.tobytes())
    assert g4.recover() == [] and g4.errors.foreign_objects == 1
    assert load(g4, [5], [g4.allocate()])[0] == [False]


def manager(tmp_path, url, secret_file=None, g2=2, g4=16):
    g4_storage = {"name": "object", "url": url}
    if secret_file:
        g4_storage["secret_file"] = str(secret_file)
    cfg = KVBMConfig.from_dict({
        "namespace": {"model": "shared-model"},
        "tiers": [{"name": "g2", "capacity": g2, "storage": {"name": "host", "pin": "never"}},
                  {"name": "g4", "capacity": g4, "storage": g4_storage}]})
    cfg.layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    return BlockManager.from_config(cfg)


def secret_file(path, data: bytes):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data)
    os.close(fd)
    return path


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_two_managers_with_different_secrets_share_a_prefix_and_never_meet(tmp_path, scheme):
    url = f"memory://kvbm-{uuid.uuid4().hex[:8]}" if scheme == "memory" else f"file://{tmp_path}/g4"
    fa, fb = secret_file(tmp_path / "a.secret", A), secret_file(tmp_path / "b.secret", B)
    keys = list(range(1, 11))
    m = manager(tmp_path, url, fa)
    n = m.tiers[0].storage.block_nbytes
    for k in keys:  # 10 blocks through a 2-block G2: 8 or more cascade into G4
        m.store([k], source=[block_content(k, n)])
    m.close()
    # deployment B on the same prefix: recovers nothing, finds nothing
    mb = manager(tmp_path, url, fb)
    assert mb.tiers[1].stats.recovered == 0 and mb.lookup(keys)[0] == 0
    assert mb.stats()["tiers"]["g4"]["foreign_objects"] >= 8  # counted, as /metrics shows it
    for k in keys:  # B stores the same keys with other bytes
        mb.store([k], source=[np.full(n, 0xEE, np.uint8)])
    mb.close()
    # A again: every block it had in G4 comes back with A's bytes
    ma = manager(tmp_path, url, fa)
    recovered = ma.tiers[1].stats.recovered
    assert recovered >= 8
    hits = [k for k in keys if k in ma]
    out = [np.zeros(n, np.uint8) for _ in hits]
    job = ma.load(hits, destination=out)
    assert job.loaded == len(hits) == recovered
    for k, buf in zip(hits, out):
        assert np.array_equal(buf, block_content(k, n)), f"block {k}: not A's bytes"
    ma.close()


def test_a_secret_file_others_can_read_is_refused_with_the_fix(tmp_path):
    path = secret_file(tmp_path / "g4.secret", A)
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match=rf"{path}.*chmod 600 {path}"):
        object_secret(secret_file=path)
    with pytest.raises(ConfigError, match=rf"tiers.g4.storage: .*chmod 600 {path}"):
        manager(tmp_path, f"file://{tmp_path}/g4", path)
    os.chmod(path, 0o600)
    assert object_secret(secret_file=path) == A
    os.chmod(path, 0o620)  # group-writable: someone else could set our secret
    with pytest.raises(SecretError, match="chmod 600"):
        object_secret(secret_file=path)


def test_a_short_or_missing_secret_is_refused(tmp_path):
    with pytest.raises(SecretError, match="at least 16"):
        object_secret(secret_file=secret_file(tmp_path / "short", b"abc\n"))
    with pytest.raises(SecretError, match="cannot read"):
        object_secret(secret_file=tmp_path / "absent")


def test_the_default_secret_is_made_once_0600_in_a_0700_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    old = os.umask(0o022)
    try:
        first = object_secret()
    finally:
        os.umask(old)
    path = default_secret_file()
    assert path == tmp_path / "config" / "kvbm" / "object.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(first) == 64 and object_secret() == first  # kept: the same deployment after a restart
    # two storages with no secret configured agree, so an embedded user's G4 survives restarts
    url = f"file://{tmp_path}/g4"
    g4 = ObjectStorage(2, 4 * KiB, namespace="ns", url=url)
    store(g4, [1], blocks(1, 4 * KiB, 1))
    g4.close()
    assert [k for k, _ in ObjectStorage(2, 4 * KiB, namespace="ns", url=url).recover()] == [1]


def test_names_hide_the_key_and_unseal_only_under_the_secret():
    a, b = Seal(A, "ns"), Seal(B, "ns")
    for key in (b"\x00" * 16, bytes(range(16)), 0, -5, 2**70, b""):
        name = a.name(key)
        assert a.key_of(name) == key and b.key_of(name) is None
        assert key.hex() not in name if isinstance(key, bytes) and key else True
    assert a.name(1) != a.name(b"1") and a.name(1) != b.name(1)
    # any tampered character breaks the seal
    name = a.name(b"\x07" * 16)
    for i in range(len(name)):
        bad = name[:i] + ("0" if name[i] != "0" else "1") + name[i + 1:]
        assert a.key_of(bad) is None
    assert a.key_of("zz") is None and a.key_of("") is None


def test_a_default_secret_that_cannot_be_made_says_what_to_set(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocked))
    with pytest.raises(SecretError, match=r"cannot make the default secret .*set secret_file"):
        object_secret()


def test_foreign_objects_and_refused_writes_reach_the_daemon_metrics():
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from kvbm.daemon.metrics import Metrics

    metrics = Metrics()
    metrics.publish({"tiers": {"g4": {"foreign_objects": 3, "writes_refused": 0},
                               "g3": {"foreign_objects": 0, "writes_refused": 5}}})
    text = generate_latest(metrics.registry).decode()
    assert 'kvbm_tier_foreign_objects_total{tier="g4"} 3.0' in text
    assert 'kvbm_tier_writes_refused_total{tier="g3"} 5.0' in text


def test_daemons_of_one_cluster_share_g4_and_another_cluster_s_objects_are_foreign(tmp_path):
    """kvbm serve: a G4 without a secret of its own is sealed by the cluster's peer secret."""
    pytest.importorskip("zmq")
    from kvbm.daemon.config import DaemonConfig
    from kvbm.daemon.server import _daemon_tiers
    from kvbm.tiers.seal import cluster_object_secret

    def tiers(peer_secret: bytes | None, **g4):
        cfg = KVBMConfig.from_dict({
            "layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16},
            "tiers": [{"name": "g2", "capacity": 4, "storage": "host"},
                      {"name": "g4", "capacity": 8, "storage": {"name": "object", "url": "memory://x", **g4}}]})
        dcfg = {}
        if peer_secret is not None:
            path = tmp_path / f"peer-{uuid.uuid4().hex[:6]}"
            dcfg["peer_secret_file"] = str(secret_file(path, peer_secret))
        return _daemon_tiers(cfg, DaemonConfig.from_dict(dcfg)).tiers[1].storage.options

    one, again, other = tiers(b"c" * 32), tiers(b"c" * 32), tiers(b"d" * 32)
    assert one["secret"] == again["secret"] == cluster_object_secret(b"c" * 32)
    assert other["secret"] != one["secret"] and one["secret"] != b"c" * 32  # derived, not the peer secret
    assert "secret" not in tiers(None)  # no cluster: the per-user default
    own = tiers(b"c" * 32, secret_file="/etc/kvbm/g4.secret")
    assert own["secret_file"] == "/etc/kvbm/g4.secret" and "secret" not in own
    # the two clusters' G4s on one prefix: one's objects are foreign to the other
    url = f"memory://kvbm-{uuid.uuid4().hex[:8]}"
    a = ObjectStorage(2, 4 * KiB, namespace="ns", url=url, secret=one["secret"])
    store(a, [1], blocks(1, 4 * KiB, 1))
    b = ObjectStorage(2, 4 * KiB, namespace="ns", url=url, secret=other["secret"])
    assert b.recover() == [] and b.errors.foreign_objects == 1
    assert ObjectStorage(2, 4 * KiB, namespace="ns", url=url, secret=again["secret"]).recover()[0][0] == 1


def test_s3_two_secrets_and_a_forgery(monkeypatch):
    """The async path (s3fs on moto): names, MAC checks on the calling thread, recover."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import sys
    from pathlib import Path

    import fsspec

    sys.path.insert(0, str(Path(__file__).parent))
    from s3server import FAKE_CREDENTIALS, MotoServer

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = MotoServer().start()
    try:
        opts = {"endpoint_url": server.endpoint}
        fsspec.filesystem("s3", skip_instance_cache=True, **opts).mkdir("kvbm-sec")
        url = "s3://kvbm-sec/run"
        a = ObjectStorage(4, 64 * KiB, namespace="ns", url=url, secret=A, storage_options=opts)
        b = ObjectStorage(4, 64 * KiB, namespace="ns", url=url, secret=B, storage_options=opts)
        keys, da = [b"\x09" * 16, 3], blocks(2, 64 * KiB, 7)
        sa = store(a, keys, da)
        assert load(b, keys, [b.allocate(), b.allocate()])[0] == [False, False]
        assert b.recover() == [] and b.errors.foreign_objects == 2
        forge(a, keys[0], blocks(1, 64 * KiB, 8)[0], bytes(MAC_BYTES))
        ok, out = load(a, keys, sa)
        # a miss (the caller never uses out[0]: verification runs beside the copy, in one pass)
        assert ok == [False, True] and np.array_equal(out[1], da[1])
        assert (a.errors.checksum_errors, a.errors.foreign_objects) == (1, 1)
        a.close()
        b.close()
    finally:
        server.stop()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.integers(min_value=-2**80, max_value=2**80)),
       st.text(min_size=1, max_size=8), st.integers(min_value=0, max_value=200))
@example(b"", "ns", 0)
@example(0, "ns", 5)
def test_every_key_round_trips_through_its_name_and_only_under_its_secret(key, namespace, flip):
    a = Seal(A, namespace)
    name = a.name(key)
    assert a.key_of(name) == key and type(a.key_of(name)) is type(key)
    assert Seal(B, namespace).key_of(name) is None
    assert Seal(A, namespace + "x").key_of(name) is None  # another namespace's keys
    i = flip % len(name)
    assert a.key_of(name[:i] + ("1" if name[i] == "0" else "0") + name[i + 1:]) is None
