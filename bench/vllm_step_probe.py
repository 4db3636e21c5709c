"""Counting what vLLM's engine does per request beside kvbm's connector (a bench probe, not product code).

    --kv-transfer-config '{"kv_connector": "KVBMConnector",
                           "kv_connector_module_path": "vllm_step_probe", ...}'   (bench/ on PYTHONPATH)
    KVBM_PROBE_OUT=/path/probe.json   where the counters go (rewritten each second while steps run, and at exit)

KVBMConnector with counters around it, in the engine core's process (one process per engine with
VLLM_ENABLE_V1_MULTIPROCESSING=0: both halves share them). Per engine step (a schedule() call:
build_connector_meta): steps, steps that scheduled no token (empty steps: the engine core then
runs its loop again after a 1 ms sleep), scheduled tokens, and the engine-core main thread's CPU
and wall seconds from one step to the next, split by whether the step was empty. Per load:
requests whose load went asynchronous (WAITING_FOR_REMOTE_KVS), the steps and seconds from
start_load_kv until get_finished reported it. bench/vllm_serve_compare.py --probe reads the file.

Per request (`timeline`, wall-clock time.time() like vLLM's Request.arrival_time), so a TTFT gap
is attributed, not guessed: arrival, first and last ask (get_num_new_matched_tokens; asks > 1 means
vLLM retried it while its pool was full), the ask's own seconds (lookup + pin), tokens matched,
alloc (update_state_after_alloc with external tokens: the load planned), load_start
(start_load_kv), load_done (the backend's ticket done: a daemon future's callback; the in-process
manager's ticket when get_finished first sees it), load_reported (get_finished returned it),
sched (the first step that scheduled it tokens), prefill_done (get_finished of the step that
scheduled its last prompt token: its first token is sampled there), stored (get_finished's
finished_sending, when any), finished (request_finished), and the step numbers of these.
Per step (`steps`): schedule time, get_finished time, tokens, requests scheduled.
phases(timeline) turns it into per-phase p50 / mean seconds.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from typing import Any

from kvbm.connectors.vllm import KVBMConnector as _Base

_LOCK = threading.Lock()
C: dict[str, float] = {
    "steps": 0, "empty_steps": 0, "scheduled_tokens": 0, "busy_cpu_s": 0.0, "busy_wall_s": 0.0,
    "empty_cpu_s": 0.0, "empty_wall_s": 0.0, "matched_calls": 0, "matched_s": 0.0, "async_loads": 0, "matched_tokens": 0,
    "loads_started": 0, "loads_reported": 0, "load_wait_steps": 0, "load_wait_s": 0.0,
    "load_wait_empty_steps": 0, "get_finished_calls": 0, "get_finished_s": 0.0,
    "start_load_kv_s": 0.0, "wait_for_save_s": 0.0, "steps_with_loads_waiting": 0,
}
_last = {"cpu": None, "wall": None, "empty": False}
_loads: dict[str, tuple[int, int, float]] = {}  # req_id -> (step, empty steps, wall) at start_load
T: dict[str, dict] = {}  # req_id -> its timeline (time.time() seconds, step numbers)
S: list[list] = []  # per step: [schedule time, get_finished time, tokens, requests]
_tickets: list[tuple[str, object]] = []  # (req_id, ticket) of loads not yet seen done
MAX_STEPS = 20000


def _dump() -> None:
    out = os.environ.get("KVBM_PROBE_OUT")
    if not out:
        return
    with _LOCK:
        data = dict(C)
        data["timeline"] = {k: dict(v) for k, v in T.items()}
        data["steps_t"] = [list(x) for x in S]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, out)


atexit.register(_dump)


def _dumper() -> None:  # the engine core may be killed at shutdown: keep the file fresh (1 s)
    last = None
    while True:
        time.sleep(1.0)
        if C["steps"] != last:
            last = C["steps"]
            _dump()


threading.Thread(target=_dumper, name="kvbm-probe-dump", daemon=True).start()


def _req(req_id: str) -> dict:
    r = T.get(req_id)
    if r is None:
        r = T[req_id] = {"asks": 0, "ask_s": 0.0}
    return r


def _first(r: dict, name: str, t: float) -> None:
    if name not in r:
        r[name] = t
        r[name + "_step"] = C["steps"]


class KVBMConnector(_Base):
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int, *args: Any, **kwargs: Any):
        t, w = time.perf_counter(), time.time()
        n, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens, *args, **kwargs)
        dt = time.perf_counter() - t
        with _LOCK:
            C["matched_s"] += dt
            C["matched_calls"] += 1
            C["matched_tokens"] += n or 0
            C["async_loads"] += bool(is_async)
            r = _req(request.request_id)
            r.setdefault("arrival", request.arrival_time)
            r.setdefault("prompt_tokens", request.num_prompt_tokens)
            _first(r, "first_ask", w)
            r["last_ask"], r["asks"], r["ask_s"] = w, r["asks"] + 1, r["ask_s"] + dt
            r["matched"] = n or 0
        return n, is_async

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            with _LOCK:
                r = _req(request.request_id)
                _first(r, "alloc", time.time())
                r["external_tokens"] = num_external_tokens
        return super().update_state_after_alloc(request, blocks, num_external_tokens)

    def request_finished(self, request: Any, block_ids: list[int]):
        with _LOCK:
            _first(_req(request.request_id), "finished", time.time())
        return super().request_finished(request, block_ids)

    def build_connector_meta(self, scheduler_output: Any):
        cpu, wall = time.thread_time(), time.perf_counter()
        empty = scheduler_output.total_num_scheduled_tokens == 0
        with _LOCK:
            if _last["cpu"] is not None:  # the previous step, until now: its kind's
                kind = "empty" if _last["empty"] else "busy"
                C[f"{kind}_cpu_s"] += cpu - _last["cpu"]
                C[f"{kind}_wall_s"] += wall - _last["wall"]
            _last.update(cpu=cpu, wall=wall, empty=empty)
            C["steps"] += 1
            C["empty_steps"] += empty
            C["scheduled_tokens"] += scheduler_output.total_num_scheduled_tokens
            C["steps_with_loads_waiting"] += bool(_loads)
            now = time.time()
            if len(S) < MAX_STEPS:
                S.append([now, None, scheduler_output.total_num_scheduled_tokens,
                          len(scheduler_output.num_scheduled_tokens)])
            cached = scheduler_output.scheduled_cached_reqs
            computed = {n.req_id: n.num_computed_tokens for n in scheduler_output.scheduled_new_reqs}
            computed.update(zip(cached.req_ids, cached.num_computed_tokens))
            for req_id, k in scheduler_output.num_scheduled_tokens.items():
                r = T.get(req_id)
                if r is None or not k:
                    continue
                _first(r, "sched", now)
                if "prefill_step" not in r and computed.get(req_id, 0) + k >= r.get("prompt_tokens", 1 << 30):
                    r["prefill_step"] = C["steps"]
        return super().build_connector_meta(scheduler_output)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        meta = self._get_connector_metadata() if self.worker.kv is not None else None
        for plan in getattr(meta, "loads", ()) or ():
            with _LOCK:
                C["loads_started"] += 1
                _loads[plan.req_id] = (C["steps"], C["empty_steps"], t)
                _first(_req(plan.req_id), "load_start", time.time())
        n0 = len(self.worker._loads)
        super().start_load_kv(forward_context, **kwargs)
        for tr in self.worker._loads[n0:]:
            _watch(tr.req_id, tr.ticket)
        with _LOCK:
            C["start_load_kv_s"] += time.perf_counter() - t

    def wait_for_save(self) -> None:
        t = time.perf_counter()
        super().wait_for_save()
        with _LOCK:
            C["wait_for_save_s"] += time.perf_counter() - t

    def get_finished(self, finished_req_ids: set[str]):
        t = time.perf_counter()
        _seen_done()
        sending, recving = super().get_finished(finished_req_ids)
        now, w = time.perf_counter(), time.time()
        with _LOCK:
            if S and S[-1][1] is None:
                S[-1][1] = w
            for req_id in recving or ():
                _first(_req(req_id), "load_reported", w)
            for req_id in sending or ():
                _first(_req(req_id), "stored", w)
            for req_id, r in T.items():
                if r.get("prefill_step") == C["steps"] and "prefill_done" not in r:
                    r["prefill_done"] = w
            C["get_finished_calls"] += 1
            C["get_finished_s"] += now - t
            for req_id in recving or ():
                got = _loads.pop(req_id, None)
                if got is not None:
                    C["loads_reported"] += 1
                    C["load_wait_steps"] += C["steps"] - got[0]
                    C["load_wait_empty_steps"] += C["empty_steps"] - got[1]
                    C["load_wait_s"] += now - got[2]
        return sending, recving


def _watch(req_id: str, ticket: Any) -> None:
    """Note when a load's ticket completes: a future's callback (daemon), else when seen done."""
    if hasattr(ticket, "add_done_callback"):
        def done(_f: Any, req_id: str = req_id) -> None:
            with _LOCK:
                _first(_req(req_id), "load_done", time.time())
        ticket.add_done_callback(done)
    else:
        with _LOCK:
            _tickets.append((req_id, ticket))


def _seen_done() -> None:
    with _LOCK:
        if not _tickets:
            return
        left = []
        for req_id, ticket in _tickets:
            if getattr(ticket, "done", False):
                _first(_req(req_id), "load_done", time.time())
            else:
                left.append((req_id, ticket))
        _tickets[:] = left


# (phase, from, to): consecutive points of a hit request's path, then the whole
PHASES = [("queue", "arrival", "first_ask"), ("wait_alloc", "first_ask", "alloc"),
          ("to_load_start", "alloc", "load_start"), ("load", "load_start", "load_done"),
          ("report", "load_done", "load_reported"), ("to_sched", "load_reported", "sched"),
          ("miss_to_sched", "first_ask", "sched"), ("prefill", "sched", "prefill_done"),
          ("arrival_to_first_token", "arrival", "prefill_done")]


def phases(timeline: dict, since: float = 0.0) -> dict:
    """Per phase over the requests that arrived at or after `since`: count, p50, mean seconds, and
    for the hits the steps between load_start and load_reported, and sched - load_reported in steps."""
    import statistics

    reqs = [r for r in timeline.values() if r.get("arrival", 0) >= since]
    hits = [r for r in reqs if "alloc" in r]
    out: dict[str, Any] = {"requests": len(reqs), "hits": len(hits)}
    for name, a, b in PHASES:
        pool = [r for r in (reqs if name in ("queue", "prefill", "arrival_to_first_token") else
                            [r for r in reqs if "alloc" not in r] if name == "miss_to_sched" else hits)
                if a in r and b in r]
        if name == "miss_to_sched":
            pool = [r for r in reqs if "alloc" not in r and a in r and b in r]
        d = sorted(r[b] - r[a] for r in pool)
        if d:
            out[name] = {"n": len(d), "p50": round(statistics.median(d), 4), "mean": round(sum(d) / len(d), 4),
                         "max": round(d[-1], 4)}
    for label, rows in (("hits", hits), ("all", reqs)):
        d = sorted(r["prefill_done"] - r["arrival"] for r in rows if "prefill_done" in r and "arrival" in r)
        if d:
            out[f"first_token_{label}_p50"] = round(statistics.median(d), 4)
    steps = [r["load_reported_step"] - r["load_start_step"] for r in hits if "load_reported_step" in r and "load_start_step" in r]
    if steps:
        out["load_steps_hist"] = {str(k): steps.count(k) for k in sorted(set(steps))}
    asks = [r["asks"] for r in reqs]
    out["asks_total"] = sum(asks)
    out["ask_s_p50"] = round(statistics.median([r["ask_s"] / max(1, r["asks"]) for r in reqs]), 6) if reqs else 0
    return out
