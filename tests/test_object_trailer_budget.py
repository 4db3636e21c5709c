"""A restart reads each recovered G4 object's trailer (one small GET per object) before the
daemon serves: on a large or slow bucket that read is bounded by a budget, newest objects first,
and the trailers not read within it count as none (the blocks are served, not published)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from kvbm.tiers import object_meta


class SlowBucket:
    """The bits of ObjectStorage that Trailers uses; reads of `stuck` paths never answer."""

    def __init__(self, stuck: set[str]) -> None:
        self._mu = threading.Lock()
        self._names = {}
        self._seal = None
        self.stuck, self.release = stuck, threading.Event()
        self.pool = ThreadPoolExecutor(4)
        self.order: list[str] = []

    def _submit(self, op, path, n):
        assert op == "tail"
        self.order.append(path)
        return self.pool.submit(self._tail, path)

    def _tail(self, path):
        if path in self.stuck:
            self.release.wait(60)
        return path.encode()


def test_trailers_past_the_budget_count_as_none_and_the_newest_are_read_first(monkeypatch):
    monkeypatch.setattr(object_meta, "parse", lambda seal, key, data: data)  # the blob is the path
    st = SlowBucket(stuck={"o/1", "o/2"})
    t = object_meta.Trailers(st, budget_s=0.5)
    for i in range(8):  # recover() reports oldest first
        st._names[i] = f"o/{i}"
        t.found(i, f"o/{i}", 200, 64)
    try:
        got = t.take()
    finally:
        st.release.set()
        st.pool.shutdown(wait=True)
    # the two stuck reads are no blob; every other trailer is read, in the oldest-first order
    assert list(got) == [0, 3, 4, 5, 6, 7] and got[7] == b"o/7"
    assert st.order == [f"o/{i}" for i in range(7, -1, -1)]  # submitted newest first
    assert t.pending == {} and t.take() == {}  # read once, then forgotten


def test_trailers_of_objects_freed_since_the_listing_are_not_read(monkeypatch):
    monkeypatch.setattr(object_meta, "parse", lambda seal, key, data: data)
    st = SlowBucket(stuck=set())
    t = object_meta.Trailers(st)
    for i in range(3):
        t.found(i, f"o/{i}", 200, 64)
    st._names = {0: "o/0", 2: "o/2"}  # object 1 was freed after recover()
    try:
        assert t.take() == {0: b"o/0", 2: b"o/2"} and st.order == ["o/2", "o/0"]
    finally:
        st.pool.shutdown(wait=True)
