"""The connectors' daemon backend: core.py's scheduler and worker halves over a real `kvbm serve`.

A daemon subprocess (a Unix socket, its own /dev/shm pool file) serves two "engines", each
with its own client, planner and paged KV: blocks stored by one are matched and loaded, byte
for byte, by the other. The daemon is always stopped (SIGTERM, then SIGKILL) and its pool
file removed.
"""

from __future__ import annotations

import uuid

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zmq")
pytest.importorskip("msgpack")
pytest.importorskip("yaml")

from kvbm.blocks import KVLayout, Namespace
from kvbm.connectors import core, trtllm
from servedaemon import Served

BS, LAYERS, HEADS, HEAD = 32, 2, 2, 16
LAYOUT = KVLayout(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD, block_size=BS, dtype="bfloat16")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A `kvbm serve` subprocess (tests/servedaemon.py) with a G2 of 64 blocks; yields its address."""
    served = Served(tmp_path_factory.mktemp("kvbm-daemon"), "d",
                    daemon={"lease_s": 60.0},  # no session lapses under a starved heartbeat
                    layout={f: getattr(LAYOUT, f) for f in LAYOUT.__dataclass_fields__}).start()
    try:
        yield served.address
    finally:
        core.release_managers()  # clients say bye before their daemon goes
        served.stop()


def tokens(seed, n):
    return [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(n)]


def pool(num_blocks=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, LAYERS, 2, HEADS * BS * HEAD, generator=g).to(torch.bfloat16)


class Engine:
    """One engine's connector halves over its own daemon client (as if in its own process)."""

    def __init__(self, address: str, seed: int, salt: str = "") -> None:
        self.backend = core.DaemonBackend.connect(address, LAYOUT, "tiny", salt=salt, timeout=60.0)
        ns = Namespace("tiny", LAYOUT, salt)
        self.sched = core.SchedulerSide(self.backend, None, ns, BS)
        self.worker = core.WorkerSide(self.backend)
        self.planner = trtllm.TrtllmPlanner(self.backend, None, ns, BS)
        self.transfers = trtllm.TrtllmTransfers(self.backend, None)
        self.kv = [torch.randn(24, 2, HEADS, BS, HEAD, generator=torch.Generator().manual_seed(seed + i))
                   .to(torch.bfloat16) for i in range(LAYERS)]
        self.worker.register(self.kv)
        self.pool = pool(seed=seed)
        self.transfers.register(self.pool)

    def close(self) -> None:
        self.backend.close()


@pytest.fixture
def engines(daemon):
    made = []

    def make(seed, salt=""):
        e = Engine(daemon, seed, salt)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def test_blocks_stored_by_one_engine_are_loaded_by_another(engines):
    a, b = engines(1), engines(2)
    hashes = [uuid.uuid4().int & (2**63 - 1) for _ in range(3)]
    before = [t.clone() for t in a.kv]
    # engine A computes a 3-block prompt (+1 token) and stores its full blocks
    a.sched.keys("r1", hashes)
    a.worker.start_store(a.sched.plan_store("r1", [0, 1, 2], 3 * BS + 1))
    loads, stores = a.worker.poll(wait=True)
    assert loads == {} and stores == {"r1"}
    # engine B: the same prefix matches whole blocks, with its own client
    keys = b.sched.keys("r2", hashes)
    assert b.sched.manager.lookup(keys)[0] == 3
    assert b.sched.match("r2", keys, 3 * BS + 1, 0, must_compute_one=True) == 3 * BS
    assert b.sched.match("r3", b.sched.keys("r3", hashes), 3 * BS, 0, must_compute_one=True) == 2 * BS
    assert b.sched.match("r4", b.sched.keys("r4", hashes), 3 * BS + 1, BS, must_compute_one=True) == 2 * BS
    b.worker.start_load(b.sched.plan_load("r2", [5, 6, 7], 3 * BS))
    loads, _ = b.worker.poll(wait=True)
    assert loads == {"r2": []}
    for tb, ta in zip(b.kv, before):
        assert torch.equal(tb[[5, 6, 7]], ta[[0, 1, 2]])
    # an unknown prefix matches nothing
    assert b.sched.match("r5", b.sched.keys("r5", [hashes[0] ^ 1, 7, 8]), 3 * BS + 1, 0, True) == 0


def test_trtllm_planner_shares_blocks_across_engines(engines):
    a, b = engines(3), engines(4)
    toks = tokens(uuid.uuid4().int % 10_000, 3 * BS + 2)
    before = a.pool.clone()
    assert a.planner.match("a", toks, 0) == 0
    meta = a.planner.step([_data("a", toks, [1, 2, 3, 4])], [])
    assert a.transfers.load(meta) == {}
    a.transfers.save(meta)
    a.transfers.worker.poll(wait=True)
    a.planner.finished("a")
    assert a.transfers.finished(["a"]) == ["a"]

    assert b.planner.match("b", toks, 0) == 3 * BS
    meta = b.planner.step([_data("b", toks, [10, 11, 12, 13])], [])
    assert [p.block_ids for p in meta.loads] == [[10, 11, 12]]
    assert b.transfers.load(meta) == {}
    assert torch.equal(b.pool[[10, 11, 12]], before[[1, 2, 3]])


def test_salted_engines_share_nothing(engines):
    a, b, c = engines(5, salt="t1"), engines(6, salt="t2"), engines(7, salt="t1")
    hashes = [uuid.uuid4().int & (2**63 - 1) for _ in range(2)]
    a.sched.keys("r", hashes)
    a.worker.start_store(a.sched.plan_store("r", [0, 1], 2 * BS + 1))
    a.worker.poll(wait=True)
    assert c.sched.match("r", c.sched.keys("r", hashes), 2 * BS + 1, 0, True) == 2 * BS
    assert b.sched.match("r", b.sched.keys("r", hashes), 2 * BS + 1, 0, True) == 0


def test_extra_config_selects_the_daemon_and_shares_one_client(daemon):
    assert core.daemon_spec({"kvbm_config": {}}, LAYOUT, "tiny") is None  # the default: in-process
    with pytest.raises(core.ConfigError, match="kvbm_daemon"):
        core.daemon_spec({"kvbm_daemon": "http://x"}, LAYOUT, "tiny")
    spec = core.daemon_spec({"kvbm_daemon": daemon, "kvbm_token": ""}, LAYOUT, "tiny")
    backend = core.shared_backend(spec)
    assert core.shared_backend(dict(spec)) is backend
    assert backend.block_nbytes == LAYOUT.block_nbytes
    assert backend.lookup([]) == (0, [])
    core.release_managers()


def test_a_layout_of_another_size_is_refused(daemon):
    from kvbm.client import RemoteError

    other = KVLayout(num_layers=LAYERS + 1, num_kv_heads=HEADS, head_dim=HEAD, block_size=BS, dtype="bfloat16")
    with pytest.raises(RemoteError):
        core.DaemonBackend.connect(daemon, other, "tiny")


def _data(req_id, toks, block_ids, computed=0):
    from types import SimpleNamespace

    return SimpleNamespace(request_id=req_id, new_tokens=list(toks), new_block_ids=list(block_ids),
                           computed_position=computed, num_scheduled_tokens=len(toks) - computed)
