"""Block identity: chained 128-bit keys rooted in a namespace, and layout sizes."""

import pytest

from kvbm.blocks import KVLayout, Namespace

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=4)


def test_keys_chain_over_the_prefix():
    ns = Namespace("llama", LAYOUT)
    a = ns.chain([1, 2, 3, 4, 5, 6, 7, 8, 9])  # 2 full blocks, the partial one has no key
    b = ns.chain([1, 2, 3, 4, 5, 6, 7, 0])
    assert len(a) == 2 and all(len(k) == 16 for k in a)
    assert a[0] == b[0] and a[1] != b[1]
    # same second block after a different first block: different key (chained)
    c = ns.chain([0, 2, 3, 4, 5, 6, 7, 8])
    assert c[1] != a[1]
    # continuing a chain from a parent gives the same keys as hashing the whole prefix
    assert ns.chain([5, 6, 7, 8], parent=a[0]) == [a[1]]


def test_namespaces_never_share_keys():
    toks = list(range(8))
    base = Namespace("llama", LAYOUT).chain(toks)
    assert Namespace("llama", LAYOUT, salt="tenant-b").chain(toks) != base
    assert Namespace("mistral", LAYOUT).chain(toks) != base
    fp8 = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=4, dtype="fp8")
    assert Namespace("llama", fp8).chain(toks) != base
    assert Namespace("llama", LAYOUT).adopt([123]) != Namespace("llama", LAYOUT, salt="x").adopt([123])


def test_extra_keys_change_identity():
    ns = Namespace("llama", LAYOUT)
    toks = list(range(8))
    assert ns.chain(toks, extra_keys=[None, ("lora", 7)])[1] != ns.chain(toks)[1]
    assert ns.chain(toks, extra_keys=[None, ("lora", 7)])[0] == ns.chain(toks)[0]


def test_adopt_engine_hashes_is_deterministic():
    ns = Namespace("llama", LAYOUT)
    assert ns.adopt([1, 2, -3]) == ns.adopt([1, 2, -3])
    assert len(set(ns.adopt([1, 2, 3]))) == 3
    assert ns.adopt([b"\x01" * 32])[0] != ns.adopt([1])[0]


def test_layout_sizes_and_fingerprint():
    llama = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    assert llama.block_nbytes == 32 * 2 * 8 * 128 * 16 * 2
    mla = KVLayout(num_layers=61, num_kv_heads=1, head_dim=576, block_size=64, kv_factor=1)
    assert mla.block_nbytes == 61 * 576 * 64 * 2
    assert llama.fingerprint == KVLayout(32, 8, 128, 16).fingerprint
    assert llama.fingerprint != KVLayout(32, 8, 128, 16, tp_rank=0, tp_size=2).fingerprint


@pytest.mark.parametrize("kw, msg", [
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="float12"), "dtype"),
    (dict(kv_factor=3), "kv_factor"),
    (dict(tp_rank=2, tp_size=2), "tp_rank"),
])
def test_layout_validation(kw, msg):
    base = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
    with pytest.raises(ValueError, match=msg):
        KVLayout(**{**base, **kw})
