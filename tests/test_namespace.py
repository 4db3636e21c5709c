"""Namespaces are unambiguous: model and salt refuse control characters, and every namespace
id (BlockKey roots, storages' namespace_id, the daemon's namespace_of, derived request
namespaces) hashes length-prefixed fields, so distinct triples never share one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvbm.blocks import KVLayout, Namespace, check_name, fields
from kvbm.config import ConfigError, KVBMConfig
from kvbm.daemon.leases import namespace_of
from kvbm.tiers.base import namespace_id

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
FP = LAYOUT.fingerprint

printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
model = printable.filter(bool)
fingerprint = st.sampled_from([FP, "-", KVLayout(1, 1, 8, 4).fingerprint, "ab", "a"])
triple = st.tuples(model, fingerprint, printable)


def ids(m: str, fp: str, salt: str) -> tuple:
    layout = {FP: LAYOUT}.get(fp)
    root = Namespace(m, layout, salt).root if fp in (FP, "-") else None
    return fields(m, fp, salt), namespace_id(m, fp, salt), namespace_of(m, fp, salt), root


@settings(max_examples=300, deadline=None)
@given(triple, triple)
# the triples that met before: a separator inside a field, and names that read alike on disk
@example(("m", FP, "s-x"), ("m", FP, "s"))
@example(("a/b", FP, ""), ("a_b", FP, ""))
@example(("m" * 70, FP, ""), ("m" * 71, FP, ""))
@example(("m", "a", "b"), ("m", "ab", ""))
@example(("m", "-", ""), ("m", FP, ""))
def test_distinct_triples_never_share_a_namespace(a, b):
    if a == b:
        assert ids(*a) == ids(*b)
        return
    for x, y in zip(ids(*a), ids(*b)):
        if x is not None and y is not None:
            assert x != y


@pytest.mark.parametrize("bad", ["a\0b", "line\nbreak", "\x1b[31mred", "del\x7f", "c1\x85"])
def test_control_characters_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=r"namespace.model .* contains the control character U\+"):
        Namespace(bad, LAYOUT)
    with pytest.raises(ValueError, match="namespace.salt"):
        Namespace("m", LAYOUT, bad)
    with pytest.raises(ValueError, match="^model "):
        namespace_of(bad, FP, "")
    with pytest.raises(ValueError, match="^salt "):
        namespace_of("m", FP, bad)
    with pytest.raises(ValueError, match="namespace.salt"):
        namespace_id("m", FP, bad)
    for key in ("model", "salt"):
        ns = {"model": "m", key: bad}
        with pytest.raises(ConfigError, match=f"namespace.{key} .* control character"):
            KVBMConfig.from_dict({"namespace": ns, "tiers": [{"name": "g2", "capacity": 4}]})


def test_the_nul_collision_of_the_issue_is_gone():
    # before: f"{model}\0{fp}\0{salt}" gave these two triples one namespace
    t1, t2 = ("m\0" + FP, FP, ""), ("m", FP, FP + "\0")
    assert fields(*t1) != fields(*t2)
    for t in (t1, t2):
        with pytest.raises(ValueError, match="control character U\\+0000"):
            namespace_of(*t)
    assert check_name("meta-llama/Llama-3.1-8B ünïcode", "m") == "meta-llama/Llama-3.1-8B ünïcode"


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.text(max_size=6), st.text(max_size=6)), st.tuples(st.text(max_size=6), st.text(max_size=6)))
@example(("cache_salt", "generation 1"), ("generation", "1"))
@example(("cache_salt", "a\0b"), ("cache_salt\0a", "b"))
def test_derived_namespaces_are_distinct_for_distinct_label_value_pairs(a, b):
    base = Namespace("m", LAYOUT, "tenant")
    assert (base.derive(*a).root == base.derive(*b).root) == (a == b)
    assert base.derive(*a).root != base.root
    assert base.derive(*a).root != Namespace("m", LAYOUT, "other").derive(*a).root


def test_a_request_salt_cannot_pose_as_a_new_generation():
    """vLLM: a request whose cache_salt was 'generation 1' shared its namespace with every
    request after reset_cache() (KV from the old weights served after the reset)."""
    from kvbm.connectors import core

    side = core.SchedulerSide(SimpleNamespace(), None, Namespace("m", LAYOUT), 4)
    hashes = [11, 12, 13]
    salted = side.keys("tenant", hashes, "\0generation 1")
    salted2 = side.keys("tenant2", hashes, "generation 1")
    side.new_generation()
    fresh = side.keys("after-reset", hashes)
    assert fresh != salted and fresh != salted2 and salted != salted2


def test_trtllm_salt_with_a_control_character_is_not_keyable():
    """TensorRT-LLM joins cache salt, LoRA and image identity with NUL: a cache salt holding
    NUL could pose as another request's (salt, LoRA) pair; such a request is not cached."""
    from kvbm.connectors import trtllm

    forged = SimpleNamespace(cache_salt="x\0lora=7")
    real = SimpleNamespace(cache_salt="x", lora_task_id=7)
    assert trtllm.request_identity(forged) == ("", False)
    assert trtllm.request_identity(real) == ("x\0lora=7", True)


def test_g3_and_g4_never_return_one_namespace_s_block_for_another(tmp_path):
    """In the daemon one G3/G4 holds every client namespace, keyed by server_key(namespace,
    key): the same client key in another namespace names another entry and another object."""
    import numpy as np

    from kvbm.daemon.leases import server_key
    from kvbm.tiers.disk import DiskStorage
    from kvbm.tiers.object import ObjectStorage

    a, b = namespace_of("m", FP, "tenant-a"), namespace_of("m", FP, "tenant-b")
    key = bytes(range(16))
    data = np.arange(4096, dtype=np.uint8)
    g3 = DiskStorage(4, 4096, namespace="daemon", path=tmp_path / "g3", direct=False)
    g4 = ObjectStorage(4, 4096, namespace="daemon", url=f"file://{tmp_path}/g4", secret=b"k" * 32)
    for store in (g3, g4):
        slot = store.allocate()
        assert store.write([(server_key(a, key), slot, data)]) == [True]
        out = np.zeros(4096, np.uint8)
        # B asks for the same client key at the very slot A's block is in: a miss, no byte copied
        assert store.read([(server_key(b, key), slot, out)]) == [False] and not out.any()
        assert store.read([(server_key(a, key), slot, out)]) == [True] and np.array_equal(out, data)
        store.close()
    assert server_key(a, key) != server_key(b, key)


def test_the_daemon_refuses_a_control_character_at_hello(tmp_path):
    pytest.importorskip("zmq")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from servedaemon import Served

    from kvbm.client import Client
    from kvbm.daemon.protocol import RemoteError

    d = Served(tmp_path, "d").start()
    try:
        with pytest.raises(ValueError, match="model 'a\\\\x00b' contains the control character U\\+0000"):
            Client(d.address, model="a\0b", layout=LAYOUT)  # refused before it is sent
        with d.client() as c:  # a client that sends it anyway gets bad_field, and no session
            for field, value in (("model", "a\0b"), ("salt", "tenant\nx")):
                with pytest.raises(RemoteError, match=f"bad_field: {field} .* control character") as info:
                    c._call("hello", {**c._hello_fields, field: value})
                assert info.value.code == "bad_field"
    finally:
        d.stop()
