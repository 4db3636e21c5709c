"""A hit the vLLM connector promises through a daemon is pinned until its load, and released once.

The scheduler half's lookup pins what it promises through its own daemon session; the worker
(vLLM's multiprocessing executor: another process, another session) cannot release those pins,
so the scheduler does, when vLLM reports the load done, when the request finishes or is aborted,
or at once for what vLLM did not take (kvbm/connectors/vllm_pins.py). A real `kvbm serve`
subprocess with a G2 of 8 blocks and no lower tier: another tenant's stores flood it, and the
promised blocks are still there for the load; the daemon's own counts (stats: pins, busy blocks)
show none left afterwards. Waits are condition waits with deadlines of 60 s or more.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":  # CI installs vLLM: a broken install must fail, not skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pytest.importorskip("yaml")
pytest.importorskip("zmq")

from kvbm.client import Client  # noqa: E402
from kvbm.connectors import core  # noqa: E402
from kvbm.connectors.vllm import KVBMConnector, layout_from_vllm  # noqa: E402
from kvbm.connectors.vllm_pins import LoadsDone  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_connector_vllm import blocks, kv_tensors, request, schedule_new, step, tokens, vllm_config  # noqa: E402,F401
from daemonproc import wait_until  # noqa: E402
from servedaemon import Served  # noqa: E402
from vllm_e2e import BLOCK  # noqa: E402

G2 = 8  # blocks: a promised prompt of 4 leaves 4 for everything else


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, vllm_config):  # noqa: F811
    """`kvbm serve`: G2 of 8 blocks of the tiny model's layout, LRU, no G3."""
    layout = layout_from_vllm(vllm_config)
    served = Served(tmp_path_factory.mktemp("kvbm-pins"), "d",
                    tiers=[{"name": "g2", "capacity": G2, "eviction": "lru", "storage": {"name": "host", "pin": "never"}}],
                    daemon={"lease_s": 60.0},  # no session lapses under a starved heartbeat
                    layout={f: getattr(layout, f) for f in layout.__dataclass_fields__}).start()
    try:
        yield {"address": served.address, "layout": layout}
    finally:
        core.release_managers()
        served.stop()


class Probe:
    """The daemon's own counts, through a session of its own (which holds nothing)."""

    def __init__(self, daemon: dict) -> None:
        self.client = Client(daemon["address"], model="kvbm-pins-probe", layout=daemon["layout"], timeout=60.0)

    def state(self) -> dict:
        return self.client.stats()["daemon"]["state"]

    def pinned(self) -> tuple[int, int]:
        """(keys pinned, G2 blocks kept busy) over every session."""
        st = self.state()
        return st["pins"], st["busy_blocks"]

    def taken(self) -> int:
        """Pins ever taken (the daemon's counter)."""
        return self.client.stats()["daemon"]["pinned_blocks"]

    def settles_at(self, want: tuple[int, int]) -> bool:
        """Unpins go out on the load lane, after the reply to the step: wait for the count."""
        return wait_until(lambda: self.pinned() == want)


@pytest.fixture
def halves(daemon, vllm_config):  # noqa: F811
    """make(apart) -> (scheduler half, worker half, the worker's KV tensors by layer) through the
    daemon: the worker in a session of its own (apart: as under vLLM's multiprocessing executor)
    or sharing the scheduler's."""
    vllm_config.kv_transfer_config.kv_connector_extra_config = {"kvbm_daemon": daemon["address"]}
    made, probe = [], Probe(daemon)

    def make(apart: bool):
        sched = KVBMConnector(vllm_config, KVConnectorRole.SCHEDULER, None)
        worker = KVBMConnector(vllm_config, KVConnectorRole.WORKER, None)
        assert isinstance(sched.manager, core.DaemonBackend) and sched.pins.active
        if apart:
            own = core.DaemonBackend.connect(daemon["address"], daemon["layout"], vllm_config.model_config.model,
                                             timeout=60.0)
            made.append(own)
            worker.worker.backend = own
        kv = kv_tensors(num_blocks=24, seed=len(made))
        worker.register_kv_caches(kv)
        return sched, worker, kv

    yield make, probe
    core.release_managers()
    for b in made:
        b.close()
    assert probe.settles_at((0, 0))  # every session's pins went with its bye
    probe.client.close()


def _flush(sched) -> None:
    """Until the unpins queued on the scheduler backend's load lane have had their replies."""
    sched.scheduler.backend._loads.submit(lambda: None).result(timeout=120)


def _store(sched, worker, req_id, toks, block_ids):
    """One prefill through both halves; its blocks are in the daemon when this returns."""
    req = request(req_id, toks)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, blocks(block_ids), 0)
    step(worker, schedule_new(sched, req, block_ids))
    worker.worker.poll(wait=True)
    sched.request_finished(req, block_ids)


def _promise(sched, req_id, toks, block_ids, take=None):
    """vLLM's scheduler: lookup, allocate, take `take` tokens (default all matched); the step's plans."""
    req = request(req_id, toks)
    n, is_async = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, blocks(block_ids), n if take is None else take)
    return req, n, schedule_new(sched, req, block_ids, num_computed=0)


def _flood(daemon, vllm_config, n: int) -> int:  # noqa: F811
    """Another tenant (its own salt, its own session) stores n new blocks one by one."""
    other = core.DaemonBackend.connect(daemon["address"], daemon["layout"], vllm_config.model_config.model,
                                       salt="another-tenant", timeout=60.0)
    try:
        stored = 0
        for i in range(n):
            t = other.start_store([uuid.uuid4().bytes], [np.full(other.block_nbytes, i, np.uint8)])
            other.poll([t], wait=True)
            stored += t.result()
        return stored
    finally:
        other.close()


def test_a_promised_hit_outlives_another_tenants_flood_and_its_pins_go_after_the_load(halves, daemon, vllm_config):  # noqa: F811
    make, probe = halves
    sched, worker, layers = make(apart=True)
    toks_a, toks_b = tokens(101, 4 * BLOCK + 7), tokens(202, 2 * BLOCK + 7)
    _store(sched, worker, "a", toks_a, [0, 1, 2, 3, 4])  # 4 full blocks
    _store(sched, worker, "b", toks_b, [5, 6, 7])  # 2 full blocks: 6 of G2's 8
    assert probe.settles_at((0, 0))
    want = {name: t[[0, 1, 2, 3]].clone() for name, t in layers.items()}

    # the scheduler promises prompt a's 4 blocks: they are pinned in its own session
    taken = probe.taken()
    req, n, meta = _promise(sched, "x", toks_a, [10, 11, 12, 13, 14])
    assert n == 4 * BLOCK
    (plan,) = meta.loads
    assert plan.pinned is False  # the worker (another session) releases nothing
    assert probe.pinned() == (4, 4) and probe.taken() - taken == 4

    # before the worker loads, another tenant stores 12 blocks into the 4 slots left: LRU evicts
    # every unpinned block (prompt b is gone), never a promised one
    assert _flood(daemon, vllm_config, 12) == 12
    keys_b = sched.scheduler.keys("probe-b", request("probe-b", toks_b).block_hashes)
    assert sched.manager.lookup(keys_b)[0] == 0
    assert sched.manager.lookup(sched.scheduler.keys("x", req.block_hashes))[0] == 4

    # the worker loads them, byte for byte, and reports it; the scheduler then releases the pins
    recving, errors = step(worker, meta)
    worker._finish_loads(wait=True)
    _, late = worker.get_finished(set())
    assert (recving or late) == {"x"} and not errors
    for name, t in layers.items():
        assert torch.equal(t[[10, 11, 12, 13]], want[name]), name
    assert probe.pinned() == (4, 4)  # held until the scheduler hears of the load
    report = worker.build_connector_worker_meta()
    assert isinstance(report, LoadsDone) and report.req_ids == {"x"}
    assert worker.build_connector_worker_meta() is None  # reported once
    sched.update_connector_output(KVConnectorOutput(finished_recving={"x"}, kv_connector_worker_meta=report))
    assert probe.settles_at((0, 0))
    sched.request_finished(req, [10, 11, 12, 13, 14])  # nothing left to release: still none, never below
    sched.update_connector_output(KVConnectorOutput(finished_recving={"x"}))
    assert probe.settles_at((0, 0))


def test_an_aborted_request_releases_its_pins_before_and_after_planning(halves):
    make, probe = halves
    sched, worker, _ = make(apart=True)
    toks = tokens(303, 3 * BLOCK + 1)
    _store(sched, worker, "s", toks, [0, 1, 2, 3])
    assert probe.settles_at((0, 0))
    # matched, never allocated (no room in vLLM's pool), then aborted
    req = request("m", toks)
    assert sched.get_num_new_matched_tokens(req, 0) == (3 * BLOCK, True)
    assert probe.pinned() == (3, 3)
    sched.get_num_new_matched_tokens(req, 0)  # asked again next step: the first match's pins go
    assert probe.settles_at((3, 3))
    sched.request_finished(req, [])
    assert probe.settles_at((0, 0))
    # matched and planned, aborted while its load is in flight: vLLM's report comes later, or never
    req, n, meta = _promise(sched, "p", toks, [8, 9, 10, 11])
    assert n == 3 * BLOCK and probe.pinned() == (3, 3)
    sched.request_finished(req, [8, 9, 10, 11])
    assert probe.settles_at((0, 0))
    step(worker, meta)
    worker._finish_loads(wait=True)
    sched.update_connector_output(KVConnectorOutput(finished_recving={"p"},
                                                    kv_connector_worker_meta=worker.build_connector_worker_meta()))
    assert probe.settles_at((0, 0))
    # matched, allocated with no external tokens (vLLM took none): released at once
    req, n, _ = _promise(sched, "z", toks, [12, 13, 14, 15], take=0)
    assert n == 3 * BLOCK
    assert probe.settles_at((0, 0))
    sched.request_finished(req, [])


def test_a_partial_take_releases_the_rest_at_once(halves):
    make, probe = halves
    sched, worker, _ = make(apart=True)
    toks = tokens(404, 4 * BLOCK + 1)
    _store(sched, worker, "s", toks, [0, 1, 2, 3, 4])
    assert probe.settles_at((0, 0))
    req, n, meta = _promise(sched, "q", toks, [8, 9, 10, 11, 12], take=2 * BLOCK)
    assert n == 4 * BLOCK and [len(p.keys) for p in meta.loads] == [2]
    assert probe.settles_at((2, 2))  # the 2 blocks vLLM did not take are released now
    step(worker, meta)
    worker._finish_loads(wait=True)
    sched.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=worker.build_connector_worker_meta()))
    assert probe.settles_at((0, 0))  # the sync report alone (no finished_recving) releases the rest
    sched.request_finished(req, [])


def test_one_session_for_both_halves_releases_each_pin_once(halves):
    # vLLM's "uni" executor: scheduler and worker in one process share one daemon session. Two
    # requests promise the same prefix; the first one's load must release its own pins only.
    make, probe = halves
    sched, worker, _ = make(apart=False)
    assert worker.worker.backend is sched.scheduler.backend
    toks = tokens(505, 3 * BLOCK + 1)
    _store(sched, worker, "s", toks, [0, 1, 2, 3])
    assert probe.settles_at((0, 0))
    r1, n1, meta1 = _promise(sched, "r1", toks, [8, 9, 10, 11])
    r2, n2, meta2 = _promise(sched, "r2", toks, [12, 13, 14, 15])
    assert n1 == n2 == 3 * BLOCK
    assert probe.pinned() == (3, 3)  # 3 keys, each pinned twice: 3 blocks busy
    recving, errors = step(worker, meta1)
    worker._finish_loads(wait=True)
    _, late = worker.get_finished(set())
    assert (recving or late) == {"r1"} and not errors
    sched.update_connector_output(KVConnectorOutput(finished_recving={"r1"},
                                                    kv_connector_worker_meta=worker.build_connector_worker_meta()))
    _flush(sched)  # r1's unpins have reached the daemon
    assert probe.pinned() == (3, 3)  # r2's promise still holds: each pin was released once
    sched.request_finished(r1, [])
    sched.request_finished(r2, [])
    assert probe.settles_at((0, 0))


def test_a_hit_past_the_quota_is_promised_unpinned_and_releases_only_real_pins(halves):
    # daemon.namespace_share 0.5 of a G2 of 8: this tenant may keep 4 blocks pinned. r1's 3 are
    # pinned; r2's 6 would make 6 distinct: refused, so r2's hit is promised unpinned (as before
    # pins), never lost. Releasing r1 first spends r2's claims on the shared keys, so r1's real
    # pins stay and protect r2; r2's release then sends the unpins. No pin leaks, none goes twice.
    make, probe = halves
    sched, worker, _ = make(apart=True)
    toks = tokens(606, 6 * BLOCK + 1)
    _store(sched, worker, "s", toks, [0, 1, 2, 3, 4, 5, 6])
    assert probe.settles_at((0, 0))
    r1, n1, _ = _promise(sched, "r1", toks[:3 * BLOCK + 1], [8, 9, 10, 11])
    assert n1 == 3 * BLOCK and probe.pinned() == (3, 3)
    r2, n2, meta2 = _promise(sched, "r2", toks, [12, 13, 14, 15, 16, 17, 18])
    assert n2 == 6 * BLOCK  # the whole hit, past the quota
    assert probe.pinned() == (3, 3) and sched.scheduler.backend.quota_claims == 6
    sched.request_finished(r1, [])
    _flush(sched)
    assert probe.pinned() == (3, 3)  # r1's release spent r2's claims: the real pins now hold r2's
    recving, errors = step(worker, meta2)
    worker._finish_loads(wait=True)
    _, late = worker.get_finished(set())
    assert (recving or late) == {"r2"} and not errors
    sched.update_connector_output(KVConnectorOutput(finished_recving={"r2"}))
    assert probe.settles_at((0, 0))
    assert not sched.scheduler.backend._claims  # every claim released
    sched.request_finished(r2, [])
