"""The connector halves under random traffic (a stateful property test), bytes checked.

An engine with 16 pages runs requests of a few conversations that share a system prompt (and
a tenant salt sometimes): match, allocate pages, load the matched blocks, compute the rest,
store the full blocks, finish, free the pages and scribble over them at once. kvbm below it
has a small G2 with background offload into G3, so blocks move while requests run. Whatever
the interleaving, every block kvbm loads into a page holds exactly the bytes the engine
computed for that key, and a salted request never sees another tenant's blocks.
"""

from __future__ import annotations

import hashlib
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

torch = pytest.importorskip("torch")

from kvbm.blocks import KVLayout, Namespace  # noqa: E402
from kvbm.connectors import core  # noqa: E402

BS, LAYERS, HEADS, HEAD = 4, 2, 2, 8
LAYOUT = KVLayout(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD, block_size=BS, dtype="float32")
PAGES = 16


def chained(labels) -> list[int]:
    """Engine block hashes: each one covers its whole prefix, as vLLM's do."""
    out, h = [], b""
    for label in labels:
        h = hashlib.blake2b(h + repr(label).encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "little"))
    return out


def page_content(engine_hash: int, salt: str) -> torch.Tensor:
    """What the engine computes for a block: a function of its prefix (and tenant)."""
    g = torch.Generator().manual_seed((engine_hash ^ hash(salt)) & (2**63 - 1))
    return torch.randn(HEADS, BS, 2 * HEAD, generator=g)


class EngineOverKvbm(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        cfg = core.resolve_config({"tiers": [
            {"name": "g2", "capacity": 6, "storage": {"name": "host", "pin": "never"}, "headroom": 2},
            {"name": "g3", "capacity": 12, "storage": {"name": "disk", "path": self.dir.name}},
        ]}, LAYOUT, f"stateful-{id(self)}")
        self.manager, self.lock = core.shared_manager(cfg)
        self.sched = core.SchedulerSide(self.manager, self.lock, Namespace(f"stateful-{id(self)}", LAYOUT), BS)
        self.worker = core.WorkerSide(self.manager, self.lock)
        # vLLM's CPU layout per layer: [num_blocks, heads, block_size, 2 * head_dim]
        self.kv = [torch.zeros(PAGES, HEADS, BS, 2 * HEAD) for _ in range(LAYERS)]
        self.worker.register(self.kv)
        self.free = list(range(PAGES))
        self.n = 0
        self.loaded_blocks = 0

    def teardown(self):
        self.worker.poll(wait=True)
        core.release_managers()
        self.dir.cleanup()

    @rule(conv=st.integers(0, 3), turns=st.integers(1, 4), salted=st.booleans(), extra=st.integers(0, BS - 1))
    def request(self, conv, turns, salted, extra):
        salt = "tenant-b" if salted else ""
        labels = [("system", 0), ("system", 1)] + [(conv, i) for i in range(2 * turns)]
        hashes = chained(labels)
        nblocks = len(hashes)
        num_tokens = nblocks * BS + extra + 1  # a partial block at the end
        if nblocks + 1 > len(self.free):
            return
        self.n += 1
        rid = f"r{self.n}"
        keys = self.sched.keys(rid, hashes, salt)
        matched = self.sched.match(rid, keys, num_tokens, 0, must_compute_one=True)
        ids = [self.free.pop() for _ in range(nblocks + 1)]
        plan = self.sched.plan_load(rid, ids, matched)
        failed: list = []
        if plan is not None:
            self.worker.start_load(plan)
            loads, _ = self.worker.poll(wait=True)
            failed = loads.get(rid, [])
        for j in range(matched // BS):  # what kvbm supplied: exactly the engine's own bytes
            if ids[j] in failed:
                continue
            want = page_content(hashes[j], salt)
            for layer in self.kv:
                assert torch.equal(layer[ids[j]], want), f"{rid}: block {j} loaded with wrong bytes"
            self.loaded_blocks += 1
        for j in range(nblocks):  # the engine computes the rest (and recomputes failed loads)
            if j >= matched // BS or ids[j] in failed:
                for layer in self.kv:
                    layer[ids[j]] = page_content(hashes[j], salt)
        for layer in self.kv:
            layer[ids[-1]] = -1.0  # the partial block: never stored
        store = self.sched.plan_store(rid, ids, num_tokens)
        if store is not None:
            self.worker.start_store(store)
        self.sched.finished(rid)
        # the scheduler's match-time pins were handed to the load and released: none leak
        assert not any(t.pins for t in self.manager.tiers), [dict(t.pins) for t in self.manager.tiers]
        for layer in self.kv:  # freed pages are reused at once: scribble over them
            layer[ids] = float("nan")
        self.free += ids

    @rule()
    def poll(self):
        self.worker.poll()

    @rule()
    def settle(self):
        self.worker.poll(wait=True)
        offloader = core._OFFLOADERS.get(id(self.manager))
        if offloader is not None:
            offloader.wait_idle(5)


EngineOverKvbm.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
test_engine_over_kvbm = EngineOverKvbm.TestCase


def test_the_machine_really_loads_blocks():
    """The property test is only as good as its traffic: a fixed run must hit kvbm."""
    machine = EngineOverKvbm()
    try:
        machine.request(conv=0, turns=2, salted=False, extra=1)
        machine.settle()
        machine.request(conv=0, turns=3, salted=False, extra=2)  # shares 2 + 4 blocks
        machine.request(conv=1, turns=1, salted=True, extra=0)  # another tenant: nothing shared
        assert machine.loaded_blocks == 6
    finally:
        machine.teardown()
