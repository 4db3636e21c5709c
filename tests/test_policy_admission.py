"""second_chance admission: reused blocks and second offers are admitted, first offers remembered."""

from kvbm.config import KVBMConfig, PolicySpec, TierConfig
from kvbm.policies.admission.second_chance import SecondChanceAdmission
from kvbm.sim.replay import simulate
from kvbm.sim.traces import Request, Trace


def test_first_offer_refused_second_admitted_reused_admitted():
    adm = SecondChanceAdmission(max_tracked=2)
    assert not adm.admit("a")  # first offer: refused, remembered
    assert adm.admit("a")  # offered again: it came back, admit
    adm.observe(["b"])  # b was hit somewhere
    assert adm.admit("b")
    for k in ("c", "d", "e"):  # ghosts are bounded: c is forgotten
        assert not adm.admit(k)
    assert not adm.admit("c")


def test_fewer_g3_writes_than_always_in_the_simulator():
    reqs = [Request(float(i), tuple(range(10 * i, 10 * i + 10)), 5120, 1) for i in range(30)]
    reqs += [Request(100.0 + i, tuple(range(10 * i, 10 * i + 10)), 5120, 1) for i in range(3)]
    trace = Trace(requests=reqs, block_size=512, format="mooncake")

    def run(admission):
        cfg = KVBMConfig(tiers=[TierConfig("g2", 20, PolicySpec("lru")),
                                TierConfig("g3", 400, PolicySpec("lru"), PolicySpec(admission))])
        return simulate(trace, cfg, progress=False)

    always, second = run("always"), run("second_chance")
    # request 0's blocks are offered twice (stored again at t=100, evicted again): only they
    # are written; always writes every victim
    assert second.tiers["g3"]["blocks_written"] == 10 < always.tiers["g3"]["blocks_written"] == 310
    assert second.prefix_hits < always.prefix_hits  # the price: first reuses after leaving g2
