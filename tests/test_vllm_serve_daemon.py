"""Two `vllm serve` engines (CPU build, multiprocessing on) sharing one `kvbm serve` daemon.

Both engines point their connector at the daemon (`"kvbm_daemon": "ipc://..."`). A prompt
served by engine A is a kvbm hit on engine B's first request, with B's greedy output equal to
A's recompute. Then the daemon is killed (SIGKILL) while both engines take traffic: no HTTP
request fails (lookups miss, loads fall back to recompute), and once a daemon is back on the
same address, a prompt stored through A is again a hit on B.
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
LAYOUT = {"num_layers": CONFIG["num_hidden_layers"], "num_kv_heads": CONFIG["num_key_value_heads"],
          "head_dim": CONFIG["head_dim"], "block_size": BLOCK, "dtype": "bfloat16", "kv_factor": 2,
          "tp_rank": 0, "tp_size": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-daemon")
    daemon = KvbmServe(work, LAYOUT, g2=96).start()
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


def test_daemon_killed_mid_traffic_no_request_fails(stack):
    daemon, a, b = stack
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


def _wait(cond, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
