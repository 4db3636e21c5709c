"""The numba fast path gives exactly the manager's counts for single-tier LRU and FIFO."""

import pytest

from kvbm.sim import fast
from kvbm.sim.replay import simulate, single_tier, sweep

pytestmark = pytest.mark.skipif(not fast.available(), reason="numba is not installed")


@pytest.mark.parametrize("policy", ["lru", "fifo"])
@pytest.mark.parametrize("capacity", [1, 7, 1000, 10000, 50000])
def test_fast_path_equals_the_manager(mooncake, policy, capacity):
    res = simulate(mooncake, single_tier(capacity, policy), progress=False)
    assert fast.replay_counts(mooncake, policy, capacity) == (res.block_hits, res.prefix_hits)


def test_sweep_uses_it_and_keeps_the_row_format(mooncake):
    rows = sweep(mooncake, ["lru", "arc"], [1000, 10000], jobs=1, progress=False)
    assert [(r["policy"], r["capacity"]) for r in rows] == [("lru", 1000), ("lru", 10000), ("arc", 1000), ("arc", 10000)]
    assert rows[1]["engine"] == "numba" and rows[2]["engine"] == "manager"
    assert round(rows[1]["prefix_hit_ratio"], 4) == 0.2112


def test_bad_arguments():
    with pytest.raises(ValueError, match="covers lru, fifo"):
        fast.replay_counts(None, "arc", 10)
    with pytest.raises(ValueError, match="at least one block"):
        fast.replay_counts(None, "lru", 0)
