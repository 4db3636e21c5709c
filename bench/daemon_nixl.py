"""`bench_daemon.py nixl`: a pull between two daemons over NIXL vs bare two-agent NIXL READs of
the same bytes, in one run (split out of bench_daemon.py, which runs it).

    bench_nixl(work, blocks, mib, rounds, trace, ab) -> dict   the figures bench_daemon.py prints
    PullPair      two daemons (b pulls from a) and a client of each; pull() times one lookup
    BareRead      a bare READ kept ready between rounds (target process + reader agent here)
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
import uuid
from pathlib import Path

import numpy as np

from bench_daemon import Daemon, block, keys_of, layout_of
from kvbm.blocks import KVLayout


def bench_nixl(work: Path, blocks: int, mib: float, rounds: int = 5, trace: bool = False, ab: str = "") -> dict:
    """Daemon-to-daemon pull vs bare two-agent NIXL READs of the same bytes, in one run.

    Each round times one pull, then one bare READ of each memory kind, so a change of load
    between them hits both (the ratio per round is `paired`). Bare READs run in two memory
    kinds: /dev/shm files (4 KiB pages here) and anonymous memory (numpy; transparent huge
    pages where the kernel gives them), like the daemons' G2 pools since issue 12. Both use the
    daemon's agent setups (peers.new_agent as the target, peers.new_pull_agent as the reader: no
    progress thread). `stock` is nixl_agent's own default (a progress
    thread that spins a core, so it runs after the others, not between them), on anonymous
    memory, as the figure recorded before. `trace`: per round, the pulling daemon's phases
    (stats counters peer_pull_*_s) and each daemon thread's CPU and run-queue seconds.
    `ab`: a folder of kvbm.daemon modules (an older peering.py, say); a second pair of daemons
    runs them, and each round pulls through both pairs in turns (the order alternating).
    """
    layout = layout_of(mib)
    nb = layout.block_nbytes
    pairs = [PullPair(work, "new", layout, blocks)]
    if ab:
        pairs.append(PullPair(work, "ab", layout, blocks, modules=ab))
    bare = {kind: BareRead(blocks, nb, kind) for kind in ("anon", "shm")}
    times: dict = {kind: [] for kind in bare}
    bare_traces: list = []  # the bench process's threads during each bare READ (its reader agent)
    try:
        for kind in bare:
            bare[kind].read()  # connect the bare agents outside the timing, as the pairs do
        for r in range(rounds):
            for pair in (pairs if r % 2 == 0 else pairs[::-1]):
                pair.pull(f"nixl{r}", trace)
            for kind in bare:
                before = _thread_cpu(os.getpid()) if trace else None
                times[kind].append(bare[kind].read())
                if trace:
                    bare_traces.append({"kind": kind, "read_s": round(times[kind][-1], 4),
                                        "cpu_s": _cpu_delta(before, _thread_cpu(os.getpid()))})
        for pair in pairs:
            pair.finish()
    finally:
        for one in bare.values():
            one.close()
        for pair in pairs:
            pair.stop()
    times["stock"] = _bare_nixl(blocks, nb, "stock", rounds)
    gb = blocks * nb / 1e9

    def fig(times: list) -> dict:
        return {"min_gbps": round(gb / max(times), 3), "median_gbps": round(gb / float(np.median(times)), 3),
                "max_gbps": round(gb / min(times), 3)}

    def versus(pulls: list, d: dict) -> dict:
        out = {}
        for kind, t in times.items():
            f = fig(t)
            out[f"ratio_vs_bare_{kind}"] = {"best": round(d["max_gbps"] / f["max_gbps"], 3),
                                            "median": round(d["median_gbps"] / f["median_gbps"], 3)}
            if kind in bare:  # the same round's pull and bare READ, one after the other
                out[f"ratio_vs_bare_{kind}"]["paired"] = [round(x / p, 3) for p, x in zip(pulls, t)]
        return out

    new = pairs[0]
    d = fig(new.times)
    out = {"blocks": blocks, "block_bytes": nb, "rounds": rounds, "wrong_blocks": new.wrong,
           "daemon_pull_end_to_end": d, "daemon_read_only_gbps_mean": new.read_gbps}
    out.update({f"bare_read_{kind}": fig(t) for kind, t in times.items()})
    out.update(versus(new.times, d))
    if trace:
        out["trace"] = new.traces
        out["bare_trace"] = bare_traces
    if ab:
        old = pairs[1]
        out["ab"] = {"modules": ab, "wrong_blocks": old.wrong, "daemon_pull_end_to_end": fig(old.times),
                     "new_over_ab_paired": [round(o / n, 3) for n, o in zip(new.times, old.times)],
                     **versus(old.times, fig(old.times))}
        if trace:
            out["ab"]["trace"] = old.traces
    return out


class PullPair:
    """Two daemons a and b (b pulls from a over NIXL) and a client of each."""

    def __init__(self, work: Path, tag: str, layout: KVLayout, blocks: int, modules: str = "") -> None:
        from kvbm.client import Client

        self.tag, self.layout, self.blocks, self.nb = tag, layout, blocks, layout.block_nbytes
        self.times: list = []
        self.traces: list = []
        self.wrong = None
        self.read_gbps = None
        self.a = Daemon(work, f"{tag}-a", layout, g2=blocks * 2, nixl=True, modules=modules)
        self.b = Daemon(work, f"{tag}-b", layout, g2=blocks * 2, nixl=True, peers=[self.a.address], modules=modules)
        self.ca = Client(self.a.address, model="bench", layout=layout, token=self.a.token)
        self.cb = Client(self.b.address, model="bench", layout=layout, token=self.b.token)
        warm = keys_of(f"{tag}-warm", 1)  # connect peers and UCX endpoints outside the timing
        self.ca.store(warm, [block(warm[0], self.nb)])
        self.cb.lookup(warm)

    def pull(self, round_tag: str, trace: bool) -> None:
        """Fresh keys stored at a, then one lookup at b (a miss there: peer_lookup at a -> NIXL
        READ -> crc32c -> commit), timed."""
        self.keys = ks = keys_of(f"{self.tag}/{round_tag}", self.blocks)
        assert self.ca.store(ks, [block(k, self.nb) for k in ks]) == self.blocks
        a, b = self.a.proc.pid, self.b.proc.pid
        before = (_phases(self.cb), _thread_cpu(a), _thread_cpu(b)) if trace else None
        t0 = time.perf_counter()
        n, _ = self.cb.lookup(ks)
        self.times.append(time.perf_counter() - t0)
        assert n == self.blocks, n
        if trace:
            after = (_phases(self.cb), _thread_cpu(a), _thread_cpu(b))
            self.traces.append({"pull_s": round(self.times[-1], 4),
                                "phases_s": {k: round(v - before[0].get(k, 0.0), 4) for k, v in after[0].items()},
                                "cpu_s_a": _cpu_delta(before[1], after[1]), "cpu_s_b": _cpu_delta(before[2], after[2])})

    def finish(self) -> None:
        """Every byte of the last round's blocks, loaded from b and checked."""
        out = [np.empty(self.nb, np.uint8) for _ in self.keys]
        assert self.cb.load(self.keys, out) == self.blocks
        self.wrong = sum(not np.array_equal(o, block(k, self.nb)) for o, k in zip(out, self.keys))
        self.read_gbps = self.cb.stats()["transfers"].get("peer->host", {}).get("gb_per_s")

    def stop(self) -> None:
        for c in (self.ca, self.cb):
            try:
                c.close()
            except Exception:
                pass
        self.b.stop()
        self.a.stop()


def _phases(c) -> dict:
    st = c.stats()["daemon"]
    return {k[len("peer_pull_"):-2]: v for k, v in st.items() if k.startswith("peer_pull_") and k.endswith("_s")}


def _thread_cpu(pid: int) -> dict:
    """Per thread of a process, by name/tid: [seconds on a CPU, seconds runnable but waiting for
    one] (/proc/PID/task/TID/schedstat, nanoseconds)."""
    out: dict = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            run, wait = (task / "schedstat").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        out[f"{name}/{task.name}"] = (int(run) / 1e9, int(wait) / 1e9)
    return out


def _cpu_delta(before: dict, after: dict) -> dict:
    """Threads that ran in between: name/tid -> [CPU seconds, run-queue wait seconds]."""
    d = {k: [round(v[0] - before.get(k, (0, 0))[0], 4), round(v[1] - before.get(k, (0, 0))[1], 4)]
         for k, v in after.items()}
    return {k: v for k, v in sorted(d.items(), key=lambda kv: -kv[1][0]) if v[0] >= 0.0005}


class BareRead:
    """A bare two-agent NIXL READ kept ready between rounds: a target process holding `blocks`
    blocks, and a reader agent here. read() -> seconds of one READ of every block, timed like
    the daemon's (descriptor lists, transfer, completion)."""

    def __init__(self, blocks: int, nb: int, kind: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_bare_agent_target, args=(blocks * nb, kind, child))
        self.proc.start()
        meta, self.base = self.conn.recv()
        self.blocks, self.nb, self.kind = blocks, nb, kind
        self.agent = _agent(f"bare-reader-{kind}", kind, reader=True)
        self.dst, self._keep = _buffer(kind, blocks * nb)
        self.reg = self.agent.register_memory([(self.dst.ctypes.data, self.dst.nbytes, 0, "")], "DRAM")
        self.agent.add_remote_agent(meta)

    def read(self) -> float:
        r, nb = self.agent, self.nb
        t0 = time.perf_counter()
        local = r.get_xfer_descs([(self.dst.ctypes.data + i * nb, nb, 0) for i in range(self.blocks)], "DRAM")
        remote = r.get_xfer_descs([(self.base + i * nb, nb, 0) for i in range(self.blocks)], "DRAM")
        h = r.initialize_xfer("READ", local, remote, "bare-target")
        state = r.transfer(h)
        while state not in ("DONE", "ERR"):
            state = r.check_xfer_state(h)
        dt = time.perf_counter() - t0
        r.release_xfer_handle(h)
        assert state == "DONE"
        assert self.dst[12345] == np.frombuffer(hashlib.shake_128(b"bare").digest(1 << 20), np.uint8)[12345]
        return dt

    def close(self) -> None:
        if self.agent is None:
            return
        self.conn.send("done")
        self.proc.join(10)
        self.agent.remove_remote_agent("bare-target")
        self.agent.deregister_memory(self.reg)
        self.agent = None  # the agent goes before its buffer is unmapped


def _buffer(kind: str, nbytes: int) -> tuple[np.ndarray, object]:
    if kind == "shm":  # like the daemon's G2 pool: a /dev/shm file, mapped shared
        import mmap

        path = f"/dev/shm/kvbm-bench-bare-{uuid.uuid4().hex[:10]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
            os.unlink(path)
        buf = np.frombuffer(m, np.uint8)
        buf[::4096] = 0  # fault in, as the pool is
        return buf, m
    buf = np.zeros(nbytes, np.uint8)
    buf[::4096] = 0
    return buf, None


def _agent(name: str, kind: str, reader: bool = False):
    """The daemon's agent setups (peers.py): a READ's target as it serves, a reader as it pulls;
    `stock`: nixl_agent's own default for both."""
    from nixl._api import nixl_agent, nixl_agent_config

    from kvbm.daemon.peers import new_agent, new_pull_agent

    if kind == "stock":
        return nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    return new_pull_agent(name, ["UCX"]) if reader else new_agent(name, ["UCX"])


def _bare_agent_target(nbytes: int, kind: str, conn) -> None:
    a = _agent("bare-target", kind)
    buf, _keep = _buffer(kind, nbytes)  # _keep: the mapping behind buf
    buf[:] = np.frombuffer(hashlib.shake_128(b"bare").digest(1 << 20) * (nbytes // (1 << 20) + 1), np.uint8)[:nbytes]
    a.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    conn.send((a.get_agent_metadata(), buf.ctypes.data))
    conn.recv()  # hold until the reader is done
    os._exit(0)  # skip nixl's teardown (it can crash at interpreter exit)


def _bare_nixl(blocks: int, nb: int, kind: str = "shm", rounds: int = 5) -> list:
    """Two agents in two processes: one READ of `blocks` descriptors per round, timed like the
    daemon's (descriptor lists, transfer, completion); seconds per round."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_bare_agent_target, args=(blocks * nb, kind, child))
    p.start()
    meta, base = parent.recv()
    r = _agent(f"bare-reader-{kind}", kind, reader=True)
    dst, _keep = _buffer(kind, blocks * nb)
    reg = r.register_memory([(dst.ctypes.data, dst.nbytes, 0, "")], "DRAM")
    r.add_remote_agent(meta)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        local = r.get_xfer_descs([(dst.ctypes.data + i * nb, nb, 0) for i in range(blocks)], "DRAM")
        remote = r.get_xfer_descs([(base + i * nb, nb, 0) for i in range(blocks)], "DRAM")
        h = r.initialize_xfer("READ", local, remote, "bare-target")
        state = r.transfer(h)
        while state not in ("DONE", "ERR"):
            state = r.check_xfer_state(h)
        times.append(time.perf_counter() - t0)
        r.release_xfer_handle(h)
        assert state == "DONE"
    assert dst[12345] == np.frombuffer(hashlib.shake_128(b"bare").digest(1 << 20), np.uint8)[12345]
    parent.send("done")
    p.join(10)
    r.remove_remote_agent("bare-target")
    r.deregister_memory(reg)
    del r  # the agent goes before its buffer is unmapped
    return times
