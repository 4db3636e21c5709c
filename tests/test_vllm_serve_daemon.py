"""Two `vllm serve` engines (CPU build, multiprocessing on) sharing one `kvbm serve` daemon.

Both engines point their connector at the daemon (`"kvbm_daemon": "ipc://..."`). A prompt
served by engine A is a kvbm hit on engine B's first request, with B's greedy output equal to
A's recompute. Then the daemon is killed (SIGKILL) while both engines take traffic: no HTTP
request fails (lookups miss, loads fall back to recompute), and once a daemon is back on the
same address, a prompt stored through A is again a hit on B.

The daemon also publishes vLLM-format KV events (daemon/kv_events.py): a router's subscriber
built from vLLM's own KVEventBatch decoder follows both engines' traffic, per (medium, locality)
as vLLM 0.32 names a tier (G2 CPU/LOCAL, G3 STORAGE/LOCAL; every event with ownership "kvbm"),
and its view equals the daemon's own (the `kv_view` op); after a dropped subscription it
resyncs through the replay socket (buffered batches, or a snapshot).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")
pytest.importorskip("httpx")
pytest.importorskip("zmq")
pytest.importorskip("yaml")

sys.path.insert(0, str(Path(__file__).parent))
from vllm_serve_helpers import BLOCK, CONFIG, KvbmServe, Server, kv_config, prompt, stored_blocks, wait_stored, write_model  # noqa: E402

PROMPT = 8 * BLOCK + 60
CPU, DISK = ("CPU", "LOCAL"), ("STORAGE", "LOCAL")  # G2's and G3's (medium, locality)
LAYOUT = {"num_layers": CONFIG["num_hidden_layers"], "num_kv_heads": CONFIG["num_key_value_heads"],
          "head_dim": CONFIG["head_dim"], "block_size": BLOCK, "dtype": "bfloat16", "kv_factor": 2,
          "tp_rank": 0, "tp_size": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-daemon")
    # G2 of 24 blocks over a G3 disk: the KV-event test's traffic demotes blocks to disk
    daemon = KvbmServe(work, LAYOUT, g2=24, g3=256, kv_events=f"ipc://{work}/kv.sock",
                       kv_events_replay=f"ipc://{work}/kvr.sock").start()
    model = write_model(work)
    # vLLM's own prefix cache is off: every reused block on these engines comes from kvbm
    a = Server(work, model, kv=kv_config(daemon.extra()), prefix_caching=False, name="a").start()
    b = Server(work, model, kv=kv_config(daemon.extra()), prefix_caching=False, name="b").start()
    try:
        a.wait()
        b.wait()
        yield daemon, a, b
    finally:
        a.stop()
        b.stop()
        daemon.stop()


def test_engine_b_hits_what_engine_a_stored(stack):
    daemon, a, b = stack
    tokens = prompt(11, PROMPT)
    before = b.external_hits()
    stores = stored_blocks(daemon.address, daemon.token, LAYOUT)
    recompute = a.complete(tokens)  # A computes and stores 8 full blocks in the daemon
    wait_stored(daemon.address, daemon.token, LAYOUT, stores + 8)  # (A's store lane ends after its reply)
    served = b.complete(tokens)  # B's first sight of the prompt
    assert b.external_hits() - before == 8 * BLOCK, b.kvbm_lines()
    assert served == recompute and len(served) == 8


def engine_hashes(tokens: list[int]) -> list[bytes]:
    """vLLM's own block hashes of a prompt's full blocks (sha256, its default, and the fixed
    default seed, or PYTHONHASHSEED when set: what both engines compute)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    fn = get_hash_fn_by_name("sha256")
    kv_cache_utils.init_none_hash(fn)
    out, parent = [], None
    for i in range(len(tokens) // BLOCK):
        parent = kv_cache_utils.hash_block_tokens(fn, parent, tokens[i * BLOCK:(i + 1) * BLOCK])
        out.append(bytes(parent))
    return out


def test_a_vllm_subscriber_follows_both_engines_per_medium_and_resyncs(stack):
    """(Before the daemon-kill test, which follows the stream across the daemon's restart.)"""
    import zmq
    from test_kv_events import Follower, replay

    from kvbm.client import Client

    daemon, a, b = stack
    ctx = zmq.Context()
    # a client in the engines' namespace (same model and layout): its topic is theirs, and the
    # daemon's `kv_view` op answers with what the tiers hold of it, by engine block hash
    probe = Client(daemon.address, model=a.model, layout=LAYOUT, token=daemon.token)
    f = Follower(ctx, daemon.kv_events, daemon.kv_events_replay, probe.topic, token=daemon.token)
    sent: list[bytes] = []  # engine hashes of every full block this test's prompts have

    def send(server: Server, tokens: list[int], max_tokens: int = 2) -> None:
        server.complete(tokens, max_tokens=max_tokens)
        sent.extend(engine_hashes(tokens))

    def join(server: Server) -> None:
        sent.extend(_join(f, server))

    try:
        before = _held(probe)  # what earlier tests left (the subscriber must learn it too)
        join(a)
        # joined a running stream: what came before came from the replay socket
        assert f.last >= 0 and f.resyncs == 1
        # A and B store four 8-block prompts: 32 blocks more than G2's 24 hold, so the oldest demote to G3
        prompts = [prompt(40 + i, PROMPT) for i in range(4)]
        for server, tokens in zip((a, b, a, b), prompts):
            send(server, tokens)
        view = _settled(f, probe, sent)
        assert set(view) == {CPU, DISK}, {p: len(v) for p, v in view.items()}
        assert set(engine_hashes(prompts[0])) <= view[DISK]  # A's first prompt went to disk
        # B asks for A's first prompt: a kvbm hit from G3, promoted into G2 (exclusive: moved)
        hits = b.external_hits()
        send(b, prompts[0])
        view = _settled(f, probe, sent)
        assert b.external_hits() - hits == 8 * BLOCK, b.kvbm_lines()[-2000:]
        assert set(engine_hashes(prompts[0])) <= view[CPU] and not view[CPU] & view[DISK]
        assert view[CPU] | view[DISK] == _union(before) | set(sent)  # every block stored, by vLLM's hash
        # stored in and removed from both places (demoted, then promoted), all owned by kvbm
        assert f.seen == {(t, *p, "kvbm") for t in ("BlockStored", "BlockRemoved") for p in (CPU, DISK)}
        # the replay socket's snapshot (start -1: a router that knows nothing) is the same view
        snap = _apply(f, replay(ctx, daemon.kv_events_replay, f.topic, -1, daemon.token))
        assert snap == view

        # the subscription drops; both engines take traffic meanwhile
        f.drop()
        last, resyncs = f.last, f.resyncs
        send(b, prompt(50, PROMPT))
        send(a, prompts[1])  # on disk: promoted again
        _wait(lambda: set(sent) <= _union(_held(probe)))
        missed = replay(ctx, daemon.kv_events_replay, f.topic, last + 1, daemon.token)
        assert missed and [s for s, _ in missed] == list(range(last + 1, last + 1 + len(missed)))
        # vLLM's own replay request ([start], no topic) gets the same batches: one model on this daemon
        plain = replay(ctx, daemon.kv_events_replay, f.topic, 0, daemon.token,
                       request=[b"", (last + 1).to_bytes(8, "big")])
        assert plain[:len(missed)] == missed
        f.subscribe()
        join(a)  # its first live batch shows the gap: the missed batches come from the replay socket
        assert f.resyncs == resyncs + 1 and f.last >= last + len(missed)
        view = _settled(f, probe, sent)
        assert set(view) == {CPU, DISK} and view[CPU] | view[DISK] == _union(before) | set(sent)
        assert set(engine_hashes(prompts[1])) <= view[CPU]
    finally:
        if f.sub is not None:
            f.sub.close(0)
        probe.close()
        ctx.term()


_JOINS = iter(range(100, 1000))  # one-block prompts' seeds


def _join(f, server: Server) -> list[bytes]:
    """PUB/SUB joins late: one-block prompts until the subscriber hears a batch (what came
    before is resynced through the replay socket); the engine hashes of the prompts sent."""
    sent: list[bytes] = []
    deadline = time.monotonic() + 600
    while not f.sub.poll(0):
        assert time.monotonic() < deadline, "the subscriber never heard a batch"
        tokens = prompt(next(_JOINS), BLOCK + 1)
        server.complete(tokens, max_tokens=1)
        sent += engine_hashes(tokens)
        f.sub.poll(2000)
    f.pump()
    return sent


def _held(probe) -> dict[tuple, set]:
    """The daemon's own view of the namespace: {(medium, locality): {engine hash}} (the kv_view op)."""
    from test_kv_events import places

    return places(probe.call("kv_view")["view"])


def _union(view: dict[tuple, set]) -> set:
    return set().union(*view.values())


def _apply(f, batches: list) -> dict[tuple, set]:
    """A fresh view from replayed batches, with the follower's decoder."""
    from collections import defaultdict

    fresh = type(f).__new__(type(f))
    fresh.decoder, fresh.view, fresh.seen = f.decoder, defaultdict(set), set()
    for _, payload in batches:
        fresh.apply(payload)
    return fresh.held()


def _settled(f, probe, stored: list, timeout: float = 600.0) -> dict[tuple, set]:
    """The daemon's view once it holds every block in `stored` (an engine's stores end after its
    reply) and the subscriber's equals it; on the deadline the assertion shows both."""
    deadline = time.monotonic() + timeout
    while True:
        f.pump(100)
        truth = _held(probe)
        if set(stored) <= _union(truth) and f.held() == truth:
            return truth
        if time.monotonic() > deadline:
            assert f.held() == truth and set(stored) <= _union(truth)
        time.sleep(0.2)


def test_daemon_killed_mid_traffic_no_request_fails(stack):
    import zmq
    from test_kv_events import Follower

    from kvbm.client import Client

    daemon, a, b = stack
    ctx = zmq.Context()
    with Client(daemon.address, model=a.model, layout=LAYOUT, token=daemon.token) as probe:
        topic = probe.topic
    f = Follower(ctx, daemon.kv_events, daemon.kv_events_replay, topic, token=daemon.token)  # a router
    _join(f, a)
    followed, resyncs = f.last, f.resyncs
    failures: list[str] = []
    done = {"n": 0}
    stop = threading.Event()

    def traffic(server: Server, seed: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                server.complete(prompt(seed * 1000 + i % 3, 3 * BLOCK + 7), max_tokens=4)
                done["n"] += 1
            except Exception as exc:  # noqa: BLE001 - a failed request is what the test looks for
                failures.append(f"{server.url}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=traffic, args=(s, k), daemon=True) for k, s in ((21, a), (22, b))]
    for t in threads:
        t.start()
    _wait(lambda: done["n"] >= 4)
    daemon.kill()
    served = done["n"]
    _wait(lambda: done["n"] >= served + 4)  # both engines keep answering with the daemon gone
    daemon.start()
    served = done["n"]
    _wait(lambda: done["n"] >= served + 4)  # and through the restart
    stop.set()
    for t in threads:
        t.join(timeout=600)
    assert failures == []
    # hits resume: a prompt stored through A after the restart is a hit on B (the clients say
    # hello to the new daemon on their own; lookups retry after the connector's back-off)
    tokens = prompt(12, PROMPT)
    deadline = time.monotonic() + 300
    hits = []
    while time.monotonic() < deadline and (not hits or hits[-1] < 8 * BLOCK):
        before = b.external_hits()
        recompute = a.complete(tokens)
        served_b = b.complete(tokens)
        hits.append(b.external_hits() - before)
        assert served_b == recompute
        if hits[-1] < 8 * BLOCK:
            time.sleep(2)
    assert hits[-1] == 8 * BLOCK, (hits, a.kvbm_lines()[-2000:], b.kvbm_lines()[-2000:])
    # the router that followed the killed daemon follows the new one: its stream numbers on above
    # the old one's, so the subscriber sees a gap, replays (a snapshot) and ends equal to the new
    # daemon's view (G2's blocks went with the old one; the new one knows engine hashes only of
    # blocks stored since it started: G3's recovered blocks are not on its stream)
    f.pump()
    stored = _join(f, a) + engine_hashes(tokens)
    assert f.last > followed and f.resyncs > resyncs
    with Client(daemon.address, model=a.model, layout=LAYOUT, token=daemon.token) as probe:
        view = _settled(f, probe, stored)
    assert set(engine_hashes(tokens)) <= _union(view)
    f.sub.close(0)
    ctx.term()


def _wait(cond, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
