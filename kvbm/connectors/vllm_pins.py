"""Pins the vLLM connector's scheduler half holds for a load, when it alone may release them.

    SchedulerPins(scheduler)        on for a backend with `scheduler_releases` (the daemon's),
                                    else inert
    SchedulerPins.hold(plan)        after plan_load: the plan's pins stay with the scheduler;
                                    the worker releases nothing (plan.pinned = False)
    SchedulerPins.release(req_id)   the load is done (vLLM's finished_recving / failed_recving,
                                    or the rank-0 worker's LoadsDone for a sync load), or the
                                    request finished or was aborted: its pins go, once
    SchedulerPins.unclaimed(req_id) matched but not taken (vLLM allocated no external tokens, or
                                    preempted before its load was planned): the match's pins go
    LoadsDone                       worker -> scheduler: requests whose loads rank 0 completed

Why: the daemon counts pins per session, and under vLLM's multiprocessing executor (and tensor
parallelism) the scheduler and the workers are different processes with different sessions.
The scheduler's lookup pins the blocks it promises through its own session; a worker's unpin
would release nothing there, and in one process (one session) it would release a pin twice.
So the worker never unpins a daemon backend's pins; the scheduler does, when vLLM tells it the
load has finished. The in-process backend keeps its behaviour (the worker's load pins its
sources itself, then releases the scheduler's pins).

Every path releases exactly once: a request's held keys leave the table when released (a dict
pop), and the match's own pins are SchedulerSide's (released at a new match, at plan_load for
what vLLM did not take, at finish). What no path reaches (a crashed engine) the daemon releases
at bye, lease expiry, the client's death or daemon.pin_s.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("kvbm.connectors.vllm")

try:  # vLLM >= 0.32: workers report back to the scheduler each step
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - an older vLLM: sync loads' pins go at request end
    KVConnectorWorkerMetadata = object  # type: ignore[misc,assignment]


class LoadsDone(KVConnectorWorkerMetadata):
    """Requests whose loads the rank-0 worker completed (its keys are the ones the scheduler pinned)."""

    def __init__(self, req_ids: set[str]) -> None:
        self.req_ids = set(req_ids)

    def aggregate(self, other: Any) -> "LoadsDone":
        return LoadsDone(self.req_ids | set(getattr(other, "req_ids", ())))


class SchedulerPins:
    """The keys pinned for each request's planned load, released by the scheduler half."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler  # a SchedulerSide (or HybridSchedulerSide)
        self.active = bool(getattr(scheduler.backend, "scheduler_releases", False))
        self.loading: dict[str, list] = {}  # req_id -> keys pinned for its load in flight

    def hold(self, plan: Any) -> None:
        if not self.active or plan is None or not plan.pinned:
            return
        self.release(plan.req_id)  # a load of an earlier schedule of this request (preempted)
        self.loading[plan.req_id] = list(plan.keys)
        plan.pinned = False  # the worker, maybe in another session, releases nothing

    def release(self, req_id: str) -> None:
        keys = self.loading.pop(req_id, None)
        if keys:
            self._unpin(keys)

    def unclaimed(self, req_id: str) -> None:
        """The match's pins of a request vLLM did not take them for (SchedulerSide's own release)."""
        if not self.active:
            return
        r = self.scheduler._reqs.get(req_id)
        if r is not None:
            self.scheduler._release(r)

    def done(self, connector_output: Any) -> None:
        """vLLM's KVConnectorOutput of a step: release the pins of every load it reports ended."""
        if not self.loading:
            return
        ended = set(getattr(connector_output, "finished_recving", None) or ())
        ended |= set(getattr(connector_output, "failed_recving", None) or ())
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        ended |= set(getattr(meta, "req_ids", ()) or ())
        for req_id in ended:
            self.release(req_id)

    def _unpin(self, keys: list) -> None:
        try:
            self.scheduler.backend.unpin(keys)
        except Exception as exc:  # noqa: BLE001 - the daemon's lease or pin_s releases them
            log.warning("kvbm unpin failed (%s: %s)", type(exc).__name__, exc)
