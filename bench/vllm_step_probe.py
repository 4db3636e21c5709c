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


def _dump() -> None:
    out = os.environ.get("KVBM_PROBE_OUT")
    if not out:
        return
    with _LOCK:
        data = dict(C)
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


class KVBMConnector(_Base):
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int, *args: Any, **kwargs: Any):
        t = time.perf_counter()
        n, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens, *args, **kwargs)
        with _LOCK:
            C["matched_s"] += time.perf_counter() - t
            C["matched_calls"] += 1
            C["matched_tokens"] += n or 0
            C["async_loads"] += bool(is_async)
        return n, is_async

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
        return super().build_connector_meta(scheduler_output)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        meta = self._get_connector_metadata() if self.worker.kv is not None else None
        for plan in getattr(meta, "loads", ()) or ():
            with _LOCK:
                C["loads_started"] += 1
                _loads[plan.req_id] = (C["steps"], C["empty_steps"], t)
        super().start_load_kv(forward_context, **kwargs)
        with _LOCK:
            C["start_load_kv_s"] += time.perf_counter() - t

    def wait_for_save(self) -> None:
        t = time.perf_counter()
        super().wait_for_save()
        with _LOCK:
            C["wait_for_save_s"] += time.perf_counter() - t

    def get_finished(self, finished_req_ids: set[str]):
        t = time.perf_counter()
        sending, recving = super().get_finished(finished_req_ids)
        now = time.perf_counter()
        with _LOCK:
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
