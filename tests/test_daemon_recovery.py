"""The daemon restarts under running engines (issue 12, item 6): clients say hello again by
themselves, requests keep completing (misses meanwhile, hits again after), and no exception
reaches the engine."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm.client import Client  # noqa: E402
from test_connector_daemon import BS, LAYOUT, Engine  # noqa: E402
from test_daemon import NB, block, daemons, make_keys  # noqa: E402,F401  (daemons is a fixture)

LAYOUT_DICT = {f: getattr(LAYOUT, f) for f in LAYOUT.__dataclass_fields__}


def test_client_says_hello_again_after_a_restart(daemons):
    d = daemons(g2=64, lease_s=60.0)  # no lease runs out under a starved heartbeat: rehellos is exact
    keys = make_keys("r", 8)
    with d.client(timeout=120) as c:
        assert c.store(keys, [block(k) for k in keys]) == 8
        res = c.prepare_store(make_keys("open", 2))  # a reservation that dies with the daemon
        d.proc.kill()
        d.proc.wait(60)
        d.start()  # same address, a fresh daemon: G2 empty, no session of ours
        assert c.lookup(keys) == (0, [])  # no_session -> hello -> retried, transparently
        assert c.rehellos == 1
        assert c.commit_store(res) == 0  # the old reservation is gone: not stored, not an error
        assert c.store(keys, [block(k) for k in keys]) == 8
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert c.load(keys, out) == 8 and all(np.array_equal(o, block(k)) for o, k in zip(out, keys))


def _request(a: Engine, b: Engine, rid: str) -> tuple[int, bool]:
    """A computes and stores a 3-block prompt; B matches it and loads what matched.
    -> (blocks B loaded, all loaded bytes right)."""
    hashes = [uuid.uuid4().int & (2**63 - 1) for _ in range(3)]
    a.sched.keys(rid, hashes)
    a.worker.start_store(a.sched.plan_store(rid, [0, 1, 2], 3 * BS + 1))
    a.worker.poll(wait=True)
    keys = b.sched.keys(rid + "b", hashes)
    hit = b.sched.match(rid + "b", keys, 3 * BS + 1, 0, must_compute_one=True) // BS
    if not hit:
        return 0, True
    for t in b.kv:
        t[[5, 6, 7]] = 0
    b.worker.start_load(b.sched.plan_load(rid + "b", [5, 6, 7][:hit], hit * BS))
    loads, _ = b.worker.poll(wait=True)
    failed = loads.get(rid + "b", [])
    ok = all(torch.equal(tb[5 + i], ta[i]) for tb, ta in zip(b.kv, a.kv) for i in range(hit) if 5 + i not in failed)
    b.sched.request_finished(rid + "b") if hasattr(b.sched, "request_finished") else None
    return hit - len(failed), ok


def test_engines_keep_running_across_a_daemon_sigkill(daemons):
    d = daemons(g2=64, layout=LAYOUT_DICT, lease_s=60.0)
    a, b = Engine(d.address, 1), Engine(d.address, 2)
    for e in (a, b):
        e.sched.retry_s = 0.0  # (if the scheduler backs off after a failure: not in this test)
    try:
        before = [_request(a, b, f"pre{i}") for i in range(4)]
        assert all(ok for _, ok in before) and sum(n for n, _ in before) == 12
        d.proc.kill()  # SIGKILL: no bye, no flush; G2 is gone
        d.proc.wait(60)
        d.start()
        after = [_request(a, b, f"post{i}") for i in range(6)]  # no exception reaches the engine
        assert all(ok for _, ok in after)
        assert sum(n for n, _ in after) >= 9  # hits resumed once both clients said hello again
        assert a.backend.rehellos >= 1 and b.backend.rehellos >= 1  # (A stores only: its store lane's)
    finally:
        a.close()
        b.close()
