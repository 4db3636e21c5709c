"""A waiting request asked again before the engine could allocate it keeps its first promise.

vLLM's scheduler asks get_num_new_matched_tokens for the head of its waiting queue every step
until its pool has room; each ask was a lookup and a pin (two round trips to a daemon) and an
unpin of the last ask's pins. SchedulerSide.match now answers a repeat from the pins it holds:
same tokens, no call to the backend; anything else (another start, a preemption, a load
planned, a miss) asks the backend again, and every pin is still released exactly once."""

from __future__ import annotations

from kvbm.connectors.core import SchedulerSide
from kvbm.blocks import Namespace

BS = 4


class Backend:
    """Counts the scheduler's calls; holds `ready` blocks of any key list."""

    pins = True

    def __init__(self, ready: int) -> None:
        self.ready = ready
        self.calls: list[tuple] = []
        self.held: dict = {}

    def lookup(self, keys):
        self.calls.append(("lookup", len(keys)))
        n = min(self.ready, len(keys))
        return n, ["g2"] * n

    def pin(self, keys):
        self.calls.append(("pin", len(keys)))
        for k in keys:
            self.held[k] = self.held.get(k, 0) + 1
        return len(keys)

    def unpin(self, keys):
        self.calls.append(("unpin", len(keys)))
        for k in keys:
            self.held[k] -= 1
            if not self.held[k]:
                del self.held[k]


def side(ready: int) -> tuple[SchedulerSide, Backend]:
    b = Backend(ready)
    s = SchedulerSide(b, None, Namespace("m"), BS)
    s.backend = b
    return s, b


def test_repeat_ask_reuses_the_pinned_promise():
    s, b = side(ready=6)
    keys = s.keys("r", list(range(8)))
    assert s.match("r", keys, 8 * BS + 1, 0, True) == 6 * BS
    assert b.calls == [("lookup", 8), ("pin", 6)]
    for _ in range(5):  # the pool is full: vLLM asks again each step
        assert s.match("r", keys, 8 * BS + 1, 0, True) == 6 * BS
    assert b.calls == [("lookup", 8), ("pin", 6)]  # no round trip for the repeats
    plan = s.plan_load("r", list(range(100, 108)), 6 * BS)
    assert plan.keys == keys[:6] and plan.block_ids == list(range(100, 106)) and plan.pinned
    assert sum(b.held.values()) == 6  # handed to the load: the worker releases them
    s.finished("r")
    assert sum(b.held.values()) == 6 and ("unpin", 6) not in b.calls


def test_repeat_released_once_when_the_request_ends_unscheduled():
    s, b = side(ready=3)
    keys = s.keys("r", list(range(5)))
    for _ in range(4):
        assert s.match("r", keys, 5 * BS, 0, True) == 3 * BS
    s.finished("r")
    assert b.held == {} and b.calls == [("lookup", 4), ("pin", 3), ("unpin", 3)]


def test_anything_else_asks_the_backend_again():
    s, b = side(ready=6)
    keys = s.keys("r", list(range(8)))
    s.match("r", keys, 8 * BS + 1, 0, True)
    s.match("r", keys, 8 * BS + 1, 2 * BS, True)  # another start: the engine holds 2 blocks now
    assert b.calls[2:] == [("lookup", 8), ("unpin", 6), ("pin", 4)]
    s.preempted("r")  # a preemption resets the match: the next ask is fresh
    s.match("r", keys, 8 * BS + 1, 2 * BS, True)
    assert b.calls[5:] == [("lookup", 8), ("unpin", 4), ("pin", 4)]
    assert sum(b.held.values()) == 4
    s.finished("r")
    assert b.held == {}


def test_a_miss_is_looked_up_again():
    s, b = side(ready=0)
    keys = s.keys("r", list(range(4)))
    assert s.match("r", keys, 4 * BS, 0, True) == 0
    b.ready = 3  # stored meanwhile by another request
    assert s.match("r", keys, 4 * BS, 0, True) == 3 * BS
    assert b.calls == [("lookup", 3), ("lookup", 3), ("pin", 3)]
