"""`kvbm simulate --json` write accounting: bytes written per tier, hits per GB, drive writes per day."""

import json

from kvbm.cli import main
from kvbm.config import KVBMConfig, PolicySpec, TierConfig
from kvbm.sim.replay import simulate
from kvbm.sim.traces import Request, Trace


def _trace():
    # two requests an hour apart (3600 s of trace): [1,2,3], then [1,2,3,4]
    reqs = [Request(0.0, (1, 2, 3), 1536, 10), Request(3600.0, (1, 2, 3, 4), 2048, 10)]
    return Trace(requests=reqs, block_size=512, format="mooncake")


def test_blocks_bytes_and_dwpd_per_tier():
    # g2 holds 3 blocks over g3 of 4: request 1 stores 1,2,3 in g2; request 2 hits 1,2,3
    # and stores 4, which evicts 1 from g2 into g3: 4 blocks written to g2, 1 to g3
    cfg = KVBMConfig(tiers=[TierConfig("g2", 3, PolicySpec("lru")), TierConfig("g3", 4, PolicySpec("lru"))])
    res = simulate(_trace(), cfg, progress=False)
    g2, g3 = res.tiers["g2"], res.tiers["g3"]
    nbytes = res.write_accounting["block_nbytes"]
    assert res.write_accounting["layout_assumed"] and nbytes == 32 * 2 * 8 * 128 * 2 * 512
    assert (g2["blocks_written"], g3["blocks_written"]) == (4, 1)
    assert g3["bytes_written"] == g3["blocks_written"] * nbytes
    # an hour of trace: a day is 24 of them
    assert abs(g3["drive_writes_per_day"] - g3["bytes_written"] / (4 * nbytes) * 24) < 1e-9
    assert g3["hits_per_gb_written"] == g3["block_hits"] / (g3["bytes_written"] / 1e9)


def test_simulate_json_has_the_fields(capsys):
    code = main(["simulate", "mooncake", "--limit", "200", "--tier", "g2=500:lru", "--tier", "g3=2000:lru",
                 "--json", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for tier in ("g2", "g3"):
        assert {"bytes_written", "hits_per_gb_written", "drive_writes_per_day"} <= set(out["tiers"][tier])
    assert out["tiers"]["g3"]["bytes_written"] > 0 and out["write_accounting"]["trace_seconds"] > 0
