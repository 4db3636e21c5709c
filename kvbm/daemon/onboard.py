"""Lower-tier I/O off the request loop: blocks in G3/G4 come up to G2 on transfer threads.

    Onboarder(manager, wake)               one per daemon; the owner thread calls all but wake
    Onboarder.start(skeys, owner) -> bool  onboard what the ready prefix of skeys holds below G2;
                                           True when the request should wait for it
    Onboarder.wait(skeys, finish, wait_s)  finish() runs on the owner thread once those blocks
                                           landed (or failed), or after wait_s, whichever is first
    Onboarder.service(now)                 complete finished transfers, run finished waiters
    refuse_object_writes(manager, owner)   a G4 put asked of the owner thread fails at once
    Onboarding                             Daemon's mixin: _defer_for_lower(session, skeys, answer)
                                           and _defer_for_room(session, skeys, answer) -> DEFERRED, or
                                           None (answer now)

A client's load_prepare (and a peer's peer_lookup) used to copy G3/G4 blocks into G2 inside the
request (manager.load): a hung object store (SIGSTOPped, a black-holed route) stalled the whole
loop for its timeout, and every G2-only client with it. Now the loop only does the metadata:
`manager.submit_load(keys)` pins the sources and reserves G2 slots; a transfer thread moves the
bytes; `manager.poll()` on the owner thread completes them. The request that needed them waits
(its reply is deferred, the loop serves everyone else) at most `wait_s`, then gets the G2 prefix
that is ready: blocks still in flight are a miss for that request, never stale bytes.

The one other place G4 I/O could run on the loop is a store into a full G2 whose background
offloader fell behind (a hung store holds it): the manager then demotes victims synchronously.
`refuse_object_writes` makes that cascade's G4 put fail at once on the owner thread, so those
victims drop (counted as the tier's `failed`) instead of the loop waiting on the store.

So that a burst of stores larger than G2's headroom does not drop blocks that way, a store whose
new blocks do not fit G2's free room waits for it (`_defer_for_room`): its reply is deferred, the
offloader is asked for that much room (its headroom raised while stores wait) and each demotion
it completes answers the waiters that now fit. A waiter goes ahead anyway, with the synchronous
cascade, at daemon.room_wait_s (2 s), or once the offloader moved nothing for daemon.room_stall_s
(0.4 s; a hung object store holds it): then no store waits again until a demotion lands a block
below, so a client storing into G2 waits room_stall_s once per hang, not once per store.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..offload import complete_demote, free_room
from . import protocol as P
from .leases import PEER_NS, owner_may_take
from .peering import DEFERRED

log = logging.getLogger("kvbm.daemon")
WAIT_S = 2.0         # a request waits at most this for its G3/G4 blocks (daemon.onboard_wait_s)
MAX_JOBS = 64        # onboarding transfers in flight; beyond this a request is answered from G2
OWNER_SHARE = 0.5    # one owner (a tenant, a uid: Session.owner) holds at most this share of them
G4_TIMEOUT_S = 2.0   # the daemon's default object-store timeout per put/get (was the client's 10 s)
# Requests waiting at once (their replies deferred: stores for G2 room, loads for G3/G4 blocks).
# Each holds its keys (up to max_keys) and a closure until answered, raises the offloader's
# headroom (stores) and is looked at on every turn of the loop; a raw client may pipeline as
# many as it likes (a deferred request leaves libzmq's queue). So they are bounded: per session
# (a Client has at most 3 in flight), per owner (a tenant, a uid: at most half, the last eighth
# only for owners with none waiting: leases.owner_may_take) and in all. Past a bound the request
# is answered `busy` at once; a count is released when its reply goes out (answered, deadline,
# cancel) or its session ends (bye, lease, death: the waiters are answered no_session then).
MAX_DEFERRED = 256
SESSION_DEFERRED = 8


class _Waiter:
    __slots__ = ("keys", "deadline", "finish", "session")

    def __init__(self, keys: list, deadline: float, finish: Callable[[], None], session: Any = None) -> None:
        self.keys, self.deadline, self.finish, self.session = keys, deadline, finish, session


class Onboarder:
    """Promotions from the tiers below G2, completed on the owner thread (see the module doc)."""

    def __init__(self, manager: Any, wake: Callable[[], None], wait_s: float = WAIT_S,
                 max_jobs: int = MAX_JOBS) -> None:
        self.manager = manager
        self.wait_s = wait_s
        self.max_jobs = max_jobs
        # one owner's tickets at most: a tenant loading its own blocks from a hung G4 (each ticket
        # held for the store's timeout) must not take every slot and turn others' G3/G4 hits into misses
        self.per_owner = max(1, int(max_jobs * OWNER_SHARE))
        self._wake = wake  # any thread: have the owner call service() soon
        self._tickets: list = []  # (ticket, owner): at most max_jobs, so owners are counted on demand
        self._inflight: dict = {}  # key -> number of our tickets bringing it up
        self._waiting: list[_Waiter] = []
        self.started = 0  # blocks whose onboarding began (stats)
        self.deferred = 0  # requests that waited

    def __len__(self) -> int:
        """Keys in flight (a bounded map: at most max_jobs tickets of max_keys each)."""
        return len(self._inflight)

    def start(self, skeys: list, owner: Any = None) -> bool:
        """Owner thread: submit the promotion of the ready prefix's blocks below G2 (unless one
        is already on its way); True if any block of that prefix is coming up. `owner` (whose
        request: Session.owner) holds at most per_owner of the max_jobs tickets, and takes one of
        the last max_jobs // 8 (the reserve) only while it holds none."""
        m = self.manager
        top = m.tiers[0]
        n, where = m.lookup(skeys)
        prefix = skeys[:n]
        lower = [k for k, w in zip(prefix, where) if w != top.name and k not in top.pending]
        if lower and owner_may_take(len(self._tickets), self.held_by(owner), self.max_jobs, self.per_owner):
            ticket = m.submit_load(lower, None)
            coming = [key for key, _, _, _ in ticket.job.promotions]
            if ticket.future is None:
                m.poll()  # nothing to copy: completes (and unpins) now
            else:  # (with no promotion, G2 full or refusing, it still pins sources until polled)
                self._tickets.append((ticket, owner))
                for k in coming:
                    self._inflight[k] = self._inflight.get(k, 0) + 1
                self.started += len(coming)
                ticket.future.add_done_callback(self._done)
        return any(k in self._inflight for k in prefix)

    def held_by(self, owner: Any) -> int:
        """Tickets in flight of `owner` (a count over at most max_jobs pairs)."""
        return sum(1 for _, o in self._tickets if o == owner)

    def wait(self, skeys: list, finish: Callable[[], None], wait_s: float | None = None,
             session: Any = None) -> None:
        """Owner thread: run finish() once skeys' blocks in flight landed, or after wait_s."""
        self.deferred += 1
        wait_s = self.wait_s if wait_s is None else min(wait_s, self.wait_s)
        self._waiting.append(_Waiter(skeys, time.monotonic() + wait_s, finish, session))

    def drop(self, session: Any) -> list:
        """Owner thread: take `session`'s waiters out (it ended); their finish() functions."""
        if not any(w.session is session for w in self._waiting):
            return []
        gone = [w.finish for w in self._waiting if w.session is session]
        self._waiting = [w for w in self._waiting if w.session is not session]
        return gone

    def service(self, now: float | None = None) -> None:
        """Owner thread: complete finished transfers; answer the waiters that can go."""
        self.manager.adopt_found()  # G4 objects its background listing found (object_resume.py)
        if self._tickets and any(t.future.done() for t, _ in self._tickets):
            self.manager.poll()
            keep = []
            for t, owner in self._tickets:
                if not t.done:
                    keep.append((t, owner))
                    continue  # an owner's share comes back as its tickets leave this list
                for key, _, _, _ in t.job.promotions:
                    c = self._inflight.pop(key, 1) - 1
                    if c > 0:
                        self._inflight[key] = c
            self._tickets = keep
        if not self._waiting:
            return
        now = time.monotonic() if now is None else now
        ready, self._waiting = self._split(now)
        for w in ready:
            try:
                w.finish()
            except Exception:  # one request's reply must not take the others down
                log.exception("answering a request after onboarding failed")

    def close(self) -> None:
        """Owner thread, at shutdown: answer every waiter with what G2 holds now."""
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            try:
                w.finish()
            except Exception:
                log.exception("answering a request at shutdown failed")

    def _split(self, now: float) -> tuple[list, list]:
        ready, keep = [], []
        for w in self._waiting:
            if w.deadline <= now or not any(k in self._inflight for k in w.keys):
                ready.append(w)
            else:
                keep.append(w)
        return ready, keep

    def _done(self, _future: Any) -> None:
        try:
            self._wake()
        except Exception:  # the owner is shutting down: close() answers the waiters
            pass


def refuse_object_writes(manager: Any, owner: Callable[[], int]) -> int:
    """Make every object-store tier's `write` fail at once when called on the thread `owner()`
    names (the request loop); other threads (the offloader) write as before. Tiers changed."""
    changed = 0
    for t in manager.tiers:
        storage = t.storage
        if getattr(storage, "medium", "") != "object" or getattr(storage, "_kvbm_off_loop", False):
            continue

        said = [0.0]

        def write(items: Any, _write: Callable = storage.write, _name: str = t.name, _said: list = said) -> list[bool]:
            if threading.get_ident() == owner():
                if time.monotonic() > _said[0]:  # once a minute at most
                    _said[0] = time.monotonic() + 60
                    log.warning("%s: %d blocks dropped instead of a synchronous put on the request loop "
                                "(the background offloader is behind; is the object store slow? a larger "
                                "headroom absorbs bursts)", _name, len(items))
                return [False] * len(items)
            return _write(items)

        storage.write = write
        storage._kvbm_off_loop = True
        changed += 1
    return changed


class _RoomWaiter:
    __slots__ = ("need", "since", "deadline", "finish", "session")

    def __init__(self, need: int, since: float, wait_s: float, finish: Callable[[], None], session: Any = None) -> None:
        self.need, self.since, self.deadline, self.finish = need, since, since + wait_s, finish
        self.session = session


class Onboarding:
    """Mixin of Daemon: requests whose blocks sit below G2 wait for them off the loop; stores
    into a full G2 wait for the offloader to make room."""

    def _init_onboarding(self) -> None:
        self.onboarder = Onboarder(self.manager, self._wake_onboarder, wait_s=self.dcfg.onboard_wait_s)
        refuse_object_writes(self.manager, lambda: self._owner_ident)
        self._room_waiters: list[_RoomWaiter] = []
        self._room_freed_at = 0.0  # when a demotion out of G2 last landed a block below
        self._room_stalled: float | None = None  # _room_freed_at when waiting last gave up
        self._room_counts = {"waited": 0, "stalled": 0}
        self._headroom = 0  # the offloader's own G2 headroom (raised while stores wait)
        self._deferred = 0  # requests waiting (room and lower tiers), at most MAX_DEFERRED
        self._deferred_by: dict = {}  # Session.owner -> its requests waiting
        self._deferred_counts = {"refused": 0}

    def _take_deferral(self, s: Any, what: str) -> None:
        """Count one more request of session s waiting, or ProtocolError busy past a bound."""
        mine = self._deferred_by.get(s.owner, 0)
        if getattr(s, "deferred", 0) >= SESSION_DEFERRED:
            why = f"this session has {s.deferred} requests waiting, the most one may ({SESSION_DEFERRED})"
        elif not owner_may_take(self._deferred, mine, MAX_DEFERRED, MAX_DEFERRED // 2):
            # (no count of others': a tenant learns nothing of another's activity from a refusal)
            why = (f"{mine} requests of this {'tenant' if isinstance(s.owner, str) and s.owner else 'client'} "
                   f"are waiting (at most {MAX_DEFERRED // 2}, fewer while the daemon's {MAX_DEFERRED} are taken)")
        else:
            s.deferred = getattr(s, "deferred", 0) + 1
            self._deferred += 1
            self._deferred_by[s.owner] = mine + 1
            return
        self._deferred_counts["refused"] += 1
        raise P.ProtocolError("busy", f"{what} would wait, but {why}; wait for their answers and retry")

    def _give_deferral(self, s: Any) -> None:
        """A waiting request of s was answered (or dropped): its counts come back."""
        s.deferred -= 1
        self._deferred -= 1
        left = self._deferred_by.get(s.owner, 0) - 1
        if left > 0:
            self._deferred_by[s.owner] = left
        else:
            self._deferred_by.pop(s.owner, None)

    def _drop_deferred(self, s: Any) -> None:
        """Session s ended (bye, lease, death, eviction): its waiting requests are answered now
        (no_session) and their counts come back, instead of holding them until their deadline."""
        if not getattr(s, "deferred", 0):
            return
        gone = self.onboarder.drop(s)
        if any(w.session is s for w in self._room_waiters):
            gone += [w.finish for w in self._room_waiters if w.session is s]
            self._room_waiters = [w for w in self._room_waiters if w.session is not s]
            off = self.offloader
            if 0 in off.headroom:
                off.headroom[0] = max(self._headroom, sum(w.need for w in self._room_waiters)) \
                    if self._room_waiters else self._headroom
        for finish in gone:
            try:
                finish()
            except Exception:
                log.exception("answering a request of an ended session failed")

    def _offload_call(self, fn: Callable, *args: Any) -> Any:
        """The offloader's owner-thread calls; a completed demotion out of G2 may let stores go."""
        if fn is complete_demote and args[1].src is self.top:
            def completed(*a: Any) -> None:
                fn(*a)
                if any(a[2]):  # some landed below: the offloader moves (slots freed by drops: it may not)
                    self._room_freed_at = time.monotonic()
                    self._room_stalled = None
                self._service_room(time.monotonic())
            return self._owner(completed, *args)
        return self._owner(fn, *args)

    def _defer_for_room(self, s: Any, skeys: list, answer: Callable[[], dict], op: str) -> Any:
        """DEFERRED when skeys' new blocks do not fit G2's free room, G2 has a tier below and the
        offloader could make room: answer() runs once it did (or it stalled, or room_wait_s
        passed). None: answer now."""
        off = self.offloader
        if self._current is None or 0 not in off.headroom or not off.alive:
            return None
        need = sum(1 for k in skeys if k not in self.manager)
        if need <= free_room(self.top) or need > self.top.capacity - len(self.top.busy):
            return None  # it fits, or no demotion could ever make that room
        if self._room_stalled is not None and self._room_stalled >= self._room_freed_at:
            return None  # waiting gave up since the last demotion: the offloader is stuck
        self._take_deferral(s, op)  # busy past the session's, its owner's or the daemon's bound
        if not self._room_waiters:
            self._headroom = off.headroom[0]
        self._room_waiters.append(_RoomWaiter(need, time.monotonic(), self.dcfg.room_wait_s,
                                              self._finisher(s, op, answer), s))
        self._room_counts["waited"] += 1
        off.headroom[0] = max(self._headroom, sum(w.need for w in self._room_waiters))
        off.kick()
        return DEFERRED

    def _service_room(self, now: float) -> None:
        """Owner thread: answer the store waiters that fit now, stalled or are past their deadline."""
        if not self._room_waiters:
            return
        waiting, self._room_waiters = self._room_waiters, []
        for i, w in enumerate(waiting):
            room = free_room(self.top)
            stalled = now - max(w.since, self._room_freed_at) > self.dcfg.room_stall_s
            if w.need <= room or stalled or now >= w.deadline:
                if stalled and w.need > room:
                    self._room_stalled = self._room_freed_at
                    self._room_counts["stalled"] += 1
                w.finish()
            else:
                self._room_waiters.append(w)
        off = self.offloader
        if self._room_waiters:
            off.headroom[0] = max(self._headroom, sum(w.need for w in self._room_waiters))
            off.kick()
        elif 0 in off.headroom:
            off.headroom[0] = self._headroom

    def _close_room(self) -> None:
        """At shutdown: every store waiting for room goes ahead now."""
        self._service_room(float("inf"))

    def _wake_onboarder(self) -> None:
        """A transfer thread: an onboarding ended; the owner completes it and answers waiters."""
        self._owner(self._onboarded, wait=False)

    def _onboarded(self) -> None:
        self.onboarder.service()
        self.offloader.kick()  # promotions filled G2

    def _defer_for_lower(self, s: Any, skeys: list, answer: Callable[[], dict], wait_s: float | None = None,
                         op: str = "load_prepare") -> Any:
        """DEFERRED when blocks of skeys' ready prefix are coming up from G3/G4: answer() runs
        once they landed (or at the deadline) and its reply goes out then, if session s is still
        open. None when nothing is on its way: answer now."""
        if self._current is None or len(self.manager.tiers) == 1 or not self.onboarder.start(skeys, s.owner):
            return None  # (G2 alone: nothing can come up)
        op = "peer_lookup" if s.namespace == PEER_NS else op
        self._take_deferral(s, op)  # busy past a bound (the onboarding goes on: a later load finds it)
        self.onboarder.wait(skeys, self._finisher(s, op, answer), wait_s, s)
        return DEFERRED

    def _finisher(self, s: Any, op: str, answer: Callable[[], dict]) -> Callable[[], None]:
        """finish() for the request being handled, deferred: on the owner thread, later, it runs
        answer() if session s is still open and the request was not cancelled, and sends the
        reply (remembered for a retry or cancel of its id)."""
        envelope, rid, t0 = self._current
        counted = [True]  # (its deferral count: given back once, when the reply goes out)

        def finish() -> None:
            if counted[0]:
                counted[0] = False
                self._give_deferral(s)
            try:
                if self.sessions.get(s.sid) is not s:
                    raise P.ProtocolError("no_session", "the session ended while this request waited")
                cancelled = getattr(s, "cancelled", None)  # the client gave up meanwhile (op_cancel)
                if cancelled is not None and rid in cancelled:
                    del cancelled[rid]
                    raise P.ProtocolError("cancelled", "this request was cancelled by the client")
                self._undo_info = None
                reply = answer()
                reply.update(id=rid, ok=True)
                out = P.pack(reply)
                remember = getattr(self, "_remember", None)  # a retry or cancel of rid finds it
                if remember is not None:
                    remember({"session": s.sid}, op, rid, out, self._undo_info)
            except P.ProtocolError as exc:
                out = P.error_reply(rid, exc.code, str(exc))
            except Exception as exc:
                log.exception("request %s failed after waiting", op)
                out = P.error_reply(rid, "internal", f"{type(exc).__name__}: {exc}")
            self._answer(envelope, out, op, t0)

        return finish
