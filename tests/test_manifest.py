"""The page manifest: bytes per page, hit rules per group kind, identity in the namespace."""

import pytest

from kvbm.blocks import Namespace
from kvbm.connectors.manifest import Buffer, PageManifest, Piece, state_key

BS = 16


def attn(name, heads=2, head=64, dtype="bfloat16"):
    return Buffer(name, (2, BS, heads, head), dtype)


def gemma(window=64):
    # one full-attention group and one sliding-window group (vLLM's HMA gives each its own table)
    return PageManifest(BS, [Piece("sliding", (attn("l0"), attn("l1")), window=window),
                             Piece("full", (attn("l2"),))])


def test_page_bytes_and_ranges():
    m = gemma()
    per_layer = 2 * BS * 2 * 64 * 2
    assert m.page_nbytes == 3 * per_layer
    assert m.offsets == [0, 2 * per_layer]
    assert m.ranges() == [(0, 0, 0, per_layer), (0, 1, per_layer, 2 * per_layer),
                          (1, 0, 2 * per_layer, 3 * per_layer)]
    assert m.layout().block_nbytes == m.page_nbytes == m.page_stride
    assert m.layout().block_size == BS


def test_mamba_state_buffers_have_their_own_shapes_and_dtypes():
    m = PageManifest(BS, [Piece("mamba", (Buffer("m0.conv", (3, 96), "bfloat16"),
                                          Buffer("m0.ssm", (4, 16, 32), "float32"))),
                          Piece("full", (attn("l1"),))])
    assert m.pieces[0].nbytes == 3 * 96 * 2 + 4 * 16 * 32 * 4
    assert m.page_nbytes == m.pieces[0].nbytes + 2 * BS * 2 * 64 * 2
    assert m.has_state and not gemma().has_state
    # a kvbm block holds whole tokens' worth of bytes: the page is padded to a multiple of BS
    assert m.page_stride % BS == 0 and 0 <= m.page_stride - m.page_nbytes < BS
    assert m.layout().block_nbytes == m.page_stride


def test_what_a_hit_needs_per_kind():
    # window 64 tokens, block 16: the last ceil(63/16) = 4 pages
    m = PageManifest(BS, [Piece("full", (attn("a"),)), Piece("sliding", (attn("b"),), window=64),
                          Piece("mamba", (Buffer("c", (8,), "float32"),))])
    full, sliding, mamba = m.needed(10)
    assert list(full) == list(range(10))
    assert list(sliding) == [6, 7, 8, 9]
    assert list(mamba) == [9]
    # a hit shorter than the window needs every page it has
    assert [list(r) for r in m.needed(2)] == [[0, 1], [0, 1], [1]]
    # pages already on the device (start) are never loaded again
    assert [list(r) for r in m.needed(10, start=8)] == [[8, 9], [8, 9], [9]]


def test_window_of_one_block_still_needs_the_last_page():
    m = PageManifest(BS, [Piece("sliding", (attn("b"),), window=1)])
    assert list(m.needed(5)[0]) == [4]


def test_sliding_window_saves_bytes_moved_to_the_engine():
    m = gemma(window=64)  # 2 sliding layers, 1 full
    per_layer = 2 * BS * 2 * 64 * 2
    n = 32
    assert m.needed_nbytes(n) == n * per_layer + 2 * 4 * per_layer
    assert m.needed_nbytes(n) < n * m.page_nbytes


def test_fingerprint_changes_with_every_field():
    base = gemma()
    variants = [
        gemma(window=128),
        PageManifest(32, base.pieces),
        PageManifest(BS, [Piece("full", (attn("l0"), attn("l1"))), Piece("full", (attn("l2"),))]),
        PageManifest(BS, [Piece("sliding", (attn("l0"), attn("l1", dtype="float16")), window=64),
                          Piece("full", (attn("l2"),))]),
        PageManifest(BS, [Piece("sliding", (attn("l0"), attn("lX")), window=64), Piece("full", (attn("l2"),))]),
        PageManifest(BS, list(reversed(base.pieces))),
        PageManifest(BS, [Piece("sliding", (attn("l0"), attn("l1", heads=4)), window=64),
                          Piece("full", (attn("l2"),))]),
    ]
    prints = {base.fingerprint} | {v.fingerprint for v in variants}
    assert len(prints) == 1 + len(variants)
    assert gemma().fingerprint == base.fingerprint  # stable


def test_round_trip_and_version():
    m = gemma()
    again = PageManifest.from_dict(m.to_dict())
    assert again == m and again.fingerprint == m.fingerprint
    data = m.to_dict()
    data["version"] = 2
    with pytest.raises(ValueError, match="version 2 is not supported"):
        PageManifest.from_dict(data)


def test_keys_of_two_layouts_never_meet():
    ns = Namespace("google/gemma-3", gemma().layout(), "")
    a = gemma().namespace(ns).adopt([123, 456])
    b = gemma(window=128).namespace(ns).adopt([123, 456])
    assert a != b and not set(a) & set(b)
    assert gemma().namespace(ns).adopt([123]) == a[:1]  # deterministic


def test_state_key_is_apart_from_the_page_key():
    k = Namespace("m").adopt([1])[0]
    assert state_key(k) != k and len(state_key(k)) == len(k) and state_key(k) == state_key(k)


@pytest.mark.parametrize("bad, match", [
    (lambda: Piece("local", (attn("a"),)), "kind 'local' is unknown"),
    (lambda: Piece("sliding", (attn("a"),)), "needs its window"),
    (lambda: Piece("full", (attn("a"),), window=8), "only a sliding piece"),
    (lambda: Piece("full", ()), "at least one buffer"),
    (lambda: Buffer("a", (2, 0), "bfloat16"), "positive dims"),
    (lambda: Buffer("a", (2,), "complex64"), "dtype 'complex64' is unknown"),
    (lambda: PageManifest(0, [Piece("full", (attn("a"),))]), "block_size"),
    (lambda: PageManifest(BS, []), "at least one piece"),
])
def test_bad_manifests_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_hybrid_paged_kv_moves_each_piece_to_its_own_group():
    torch = pytest.importorskip("torch")
    from kvbm.connectors.paged_hybrid import HybridPagedKV

    m = gemma()
    g = torch.Generator().manual_seed(1)
    kv = {name: torch.randn(12, 2, BS, 2 * 64, generator=g).to(torch.bfloat16) for name in ("l0", "l1", "l2")}
    hp = HybridPagedKV(m, kv)
    pages = [(1, 5), (None, 6), (3, 7)]  # page 1 holds no sliding piece: zero in its row
    rows = hp.gather(pages, staging=torch.full((3, m.page_stride), 0xAB, dtype=torch.uint8))
    lo, hi = m.piece_range(0)
    assert int(rows[1, lo:hi].abs().sum()) == 0
    assert torch.equal(rows[0, lo:lo + kv["l0"][1].numel() * 2], kv["l0"][1].flatten().view(torch.uint8))
    before = {k: v.clone() for k, v in kv.items()}
    # scatter: the full piece everywhere (consecutive rows: written through a view), the
    # sliding piece of rows 0 and 2 (not consecutive: copied)
    hp.scatter(rows, [(9, 10), (None, 11), (8, 0)])
    assert torch.equal(kv["l2"][10], before["l2"][5]) and torch.equal(kv["l2"][0], before["l2"][7])
    assert torch.equal(kv["l0"][9], before["l0"][1]) and torch.equal(kv["l1"][8], before["l1"][3])
    assert torch.equal(kv["l0"][11], before["l0"][11])  # no sliding piece: untouched
