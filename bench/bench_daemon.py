"""Cache-daemon benchmarks.

    python bench/bench_daemon.py load   [--clients 8 --ops 10000]   mixed ops from N processes: errors,
                                                                    wrong bytes, throughput, p50/p99, and
                                                                    the limit: a bare zmq+msgpack round
                                                                    trip (ipc, same run, p50 and ratio)
    python bench/bench_daemon.py local  [--blocks 256 --mib 1]      same-node client path vs in-process
                                                                    manager (store and load GB/s, ratio)
    python bench/bench_daemon.py nixl   [--blocks 256 --mib 1 --rounds 5 --trace]
                                                                    cross-daemon pull GB/s vs bare two-agent
                                                                    NIXL READs of the same bytes (min/median)
    python bench/bench_daemon.py guard  [--blocks 256 --mib 1]      the daemon's window <-> G2 copy vs a crc32c of
                                                                    the same blocks (what a per-load checksum would add)
    python bench/bench_daemon.py all

Every block's bytes derive from its key (shake_128), so every reader verifies what it got.
The nixl bench lives in daemon_nixl.py (--ab DIR: a second daemon pair runs older kvbm/daemon
modules, pulls alternating; --trace: the pull's phases and each daemon thread's CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

from kvbm.blocks import KVLayout


def layout_of(mib: float) -> KVLayout:
    # num_layers scales the block: 2 KV x 8 heads x 128 dim x 16 tokens x 2 bytes = 64 KiB per layer
    return KVLayout(num_layers=max(1, int(mib * 16)), num_kv_heads=8, head_dim=128, block_size=16)


def block(key: bytes, nbytes: int) -> np.ndarray:
    return np.frombuffer(hashlib.shake_128(key).digest(nbytes), dtype=np.uint8)


def pattern(key: bytes, nbytes: int) -> np.ndarray:
    """A block's bytes for the small-ops bench: its 16-byte key repeated (distinct per key, so a
    wrong block is seen; ~100x cheaper than shake_128, which was ~75 % of the clients' CPU per
    op and hid the daemon's own cost in ops/s)."""
    return np.frombuffer(key * (nbytes // len(key)), dtype=np.uint8)


def keys_of(tag: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]


# `kvbm serve` with some of kvbm.daemon's modules replaced by the files of another folder (an
# older peering.py from `git show`, say): the A/B of bench_daemon.py nixl --ab DIR
_BOOT = """
import importlib.abc, importlib.util, pathlib, runpy, sys
folder = pathlib.Path(sys.argv[1])
class Older(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        f = folder / (name.rpartition(".")[2] + ".py")
        if name.startswith("kvbm.daemon.") and f.is_file():
            return importlib.util.spec_from_file_location(name, f)
        return None
sys.meta_path.insert(0, Older())
sys.argv = ["kvbm"] + sys.argv[2:]
runpy.run_module("kvbm.cli", run_name="__main__")
"""


class Daemon:
    def __init__(self, work: Path, name: str, layout: KVLayout, g2: int, nixl: bool = False,
                 peers: list | None = None, address: str = "tcp://127.0.0.1:*", modules: str = "") -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shm = f"kvbm-bench-{uuid.uuid4().hex[:10]}"
        lay = {k: getattr(layout, k) for k in ("num_layers", "num_kv_heads", "head_dim", "block_size")}
        cfg = {"namespace": {"model": "bench"}, "layout": lay,
               "tiers": [{"name": "g2", "capacity": g2, "eviction": "lru", "storage": "host"}],
               "daemon": {"address": address, "events": "", "metrics": "", "shm_name": self.shm,
                          "lease_s": 10.0, "nixl": nixl, "peers": peers or [], "peer_timeout_s": 10.0,
                          "max_keys": 4096}}
        # tcp:// needs a token (any local user reaches a tcp port); the daemons of one bench share it
        self.token = "kvbm-bench-token" if address.startswith("tcp://") or peers else ""
        if self.token:
            cfg["daemon"]["token"] = self.token
        if nixl:  # the daemons of one bench share a peer secret (they prove it in peer_hello)
            secret = work / "peer.secret"
            if not secret.exists():
                secret.write_bytes(os.urandom(32).hex().encode())
                secret.chmod(0o600)
            cfg["daemon"]["peer_secret_file"] = str(secret)
        (self.dir / "kvbm.yaml").write_text(yaml.safe_dump(cfg))
        out = self.dir / "stdout.txt"
        head = [sys.executable, "-c", _BOOT, modules] if modules else [sys.executable, "-m", "kvbm.cli"]
        self.proc = subprocess.Popen([*head, "serve", "--config", str(self.dir / "kvbm.yaml")],
                                     stdout=out.open("w"), stderr=(self.dir / "stderr.txt").open("w"))
        deadline = time.monotonic() + 60
        self.info: dict = {}
        while not self.info:
            for line in out.read_text().splitlines():
                if line.startswith('{"ready"'):
                    self.info = json.loads(line)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.dir / "stderr.txt").read_text()[-2000:])
            time.sleep(0.05)
        self.address = self.info["address"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- load

def _load_worker(address: str, idx: int, ops: int, nbytes_mib: float, seed: int, q) -> None:
    from kvbm.client import Client

    layout = layout_of(nbytes_mib)
    c = Client(address, model="bench", layout=layout)
    q.put(mixed_ops(c, idx, ops, layout.block_nbytes, np.random.default_rng(seed + idx)))
    c.close()


def mixed_ops(c, idx: int, ops: int, nb: int, rng) -> dict:
    """`ops` small ops of 4 blocks on client c: 40 % lookup, 25 % store, 25 % load (verified),
    5 % pin + unpin, 5 % events; half on this client's keys, half on keys all clients share."""
    own = keys_of(f"own{idx}", 512)
    shared = keys_of("shared", 512)
    lat: dict[str, list] = {}
    errors, wrong, loaded = [], 0, 0
    out = [np.zeros(nb, np.uint8) for _ in range(4)]
    for _ in range(ops):
        pool = own if rng.random() < 0.5 else shared
        lo = int(rng.integers(0, len(pool) - 4))
        ks = pool[lo:lo + 4]
        r = rng.random()
        op = "lookup" if r < 0.4 else "store" if r < 0.65 else "load" if r < 0.9 else "pin" if r < 0.95 else "events"
        # the bytes are made and checked outside the timing: it measures the op, not shake_128
        src = [pattern(k, nb) for k in ks] if op == "store" else None
        n = 0
        t0 = time.perf_counter()
        try:
            if op == "lookup":
                c.lookup(ks)
            elif op == "store":
                c.store(ks, src)
            elif op == "load":
                n = c.load(ks, out)
            elif op == "pin":
                c.pin(ks)
                c.unpin(ks)
            else:
                c.events()
        except Exception as exc:
            errors.append(repr(exc))
        lat.setdefault(op, []).append(time.perf_counter() - t0)
        if n:
            loaded += n
            wrong += sum(not np.array_equal(o, pattern(k, nb)) for o, k in zip(out[:n], ks))
    return {"lat": lat, "errors": errors, "wrong": wrong, "loaded": loaded}


def _bare_server(address: str, conn) -> None:
    """The limit of one request: a ROUTER that unpacks each msgpack request and packs a reply."""
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    conn.send("ready")
    while True:
        ident, payload = sock.recv_multipart()
        msg = msgpack.unpackb(payload, raw=False)
        if msg["op"] == "stop":
            break
        sock.send_multipart([ident, msgpack.packb({"id": msg["id"], "ok": True, "n": 4, "where": ["g2"] * 4},
                                                  use_bin_type=True)])
    sock.close(0)
    ctx.term()


def bare_roundtrip(work: Path, n: int = 3000) -> dict:
    """p50/p99 of a bare zmq DEALER -> ROUTER round trip over ipc:// (the daemon's same-node
    transport) carrying a lookup-sized msgpack request (4 keys, a session id) and its reply."""
    import msgpack
    import zmq

    address = f"ipc://{work}/bare.sock"
    ctx_mp = mp.get_context("spawn")
    parent, child = ctx_mp.Pipe()
    p = ctx_mp.Process(target=_bare_server, args=(address, child))
    p.start()
    assert parent.recv() == "ready"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    ks = keys_of("bare", 4)
    lat = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        sock.send(msgpack.packb({"op": "lookup", "id": i + 1, "session": ks[0], "keys": ks, "remote": True},
                                use_bin_type=True))
        reply = msgpack.unpackb(sock.recv(), raw=False)
        if i >= 200:  # after a warm-up
            lat.append(time.perf_counter() - t0)
        assert reply["id"] == i + 1
    sock.send(msgpack.packb({"op": "stop", "id": 0}, use_bin_type=True))
    p.join(10)
    sock.close(0)
    ctx.term()
    arr = np.array(lat)
    return {"n": n, "p50_us": round(float(np.percentile(arr, 50)) * 1e6, 1),
            "p99_us": round(float(np.percentile(arr, 99)) * 1e6, 1)}


def bench_load(work: Path, clients: int, ops: int) -> dict:
    bare = bare_roundtrip(work)  # the limit, in the same run (and again after, for a noisy box)
    d = Daemon(work, "load", layout_of(1 / 16), g2=8192, address=f"ipc://{work}/load.sock")
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_load_worker, args=(d.address, i, ops, 1 / 16, 7, q)) for i in range(clients)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results = [q.get(timeout=900) for _ in procs]
        wall = time.perf_counter() - t0
        for p in procs:
            p.join()
    finally:
        d.stop()
    all_lat = np.concatenate([np.array(v) for r in results for v in r["lat"].values()])
    per_op = {}
    for op in ("lookup", "store", "load", "pin", "events"):
        arr = np.concatenate([np.array(r["lat"].get(op, [])) for r in results])
        if arr.size:
            per_op[op] = {"n": int(arr.size), "p50_us": round(float(np.percentile(arr, 50)) * 1e6, 1),
                          "p99_us": round(float(np.percentile(arr, 99)) * 1e6, 1)}
    bare_after = bare_roundtrip(work)
    p50 = float(np.percentile(all_lat, 50)) * 1e6
    limit = min(bare["p50_us"], bare_after["p50_us"])
    return {"clients": clients, "ops_per_client": ops, "block_bytes": layout_of(1 / 16).block_nbytes,
            "bare_roundtrip": {"before": bare, "after": bare_after},
            "p50_over_bare_p50": round(p50 / limit, 3),  # the limit: the faster bare run's p50
            "requests_per_op": "lookup 1, store 1 (<= 16 keys), load 1, pin 2 (pin + unpin), events 1",
            "errors": sum(len(r["errors"]) for r in results), "first_errors": [e for r in results for e in r["errors"]][:3],
            "wrong_bytes_blocks": sum(r["wrong"] for r in results), "blocks_loaded": sum(r["loaded"] for r in results),
            "ops_per_s": round(clients * ops / wall, 1), "wall_s": round(wall, 2),
            "p50_us": round(float(np.percentile(all_lat, 50)) * 1e6, 1),
            "p99_us": round(float(np.percentile(all_lat, 99)) * 1e6, 1), "per_op": per_op,
            "cpus": os.cpu_count()}


# ---------------------------------------------------------------- same-node client vs in-process

def bench_local(work: Path, blocks: int, mib: float, rounds: int = 3) -> dict:
    from kvbm.client import Client
    from kvbm.config import KVBMConfig
    from kvbm.manager import BlockManager

    layout = layout_of(mib)
    nb = layout.block_nbytes
    ks = keys_of("local", blocks)
    src = [block(k, nb) for k in ks]
    dst = [np.empty(nb, np.uint8) for _ in ks]
    cfg = KVBMConfig.from_dict({"namespace": {"model": "bench"},
                                "layout": {k: getattr(layout, k) for k in ("num_layers", "num_kv_heads", "head_dim",
                                                                           "block_size")},
                                "tiers": [{"name": "g2", "capacity": blocks * 2, "storage": "host"}]})

    def best(fn) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    m = BlockManager.from_config(cfg)
    m.store(ks, source=src)

    def m_store():
        m.remove(ks)
        m.store(ks, source=src)

    inproc_store = best(m_store)
    inproc_load = best(lambda: m.load(ks, destination=dst))
    assert all(np.array_equal(a, b) for a, b in zip(src, dst))
    m.close()

    d = Daemon(work, "local", layout, g2=blocks * 2)
    try:
        c = Client(d.address, model="bench", layout=layout, token=d.token)
        salt = [0]

        def c_store():  # new keys each round (a daemon client cannot remove): same bytes moved
            salt[0] += 1
            c.store(keys_of(f"local{salt[0]}", blocks), src)

        client_store = best(c_store)
        c.store(ks, src)
        client_load = best(lambda: c.load(ks, dst))
        assert all(np.array_equal(a, b) for a, b in zip(src, dst))
        c.close()
    finally:
        d.stop()
    gb = blocks * nb / 1e9
    return {"blocks": blocks, "block_bytes": nb,
            "inproc_store_gbps": round(gb / inproc_store, 2), "client_store_gbps": round(gb / client_store, 2),
            "store_ratio": round(inproc_store / client_store, 3),
            "inproc_load_gbps": round(gb / inproc_load, 2), "client_load_gbps": round(gb / client_load, 2),
            "load_ratio": round(inproc_load / client_load, 3)}


# ---------------------------------------------------------------- copy vs checksum

def bench_guard(blocks: int, mib: float, rounds: int = 5) -> dict:
    """The daemon copies each block between a client's window and G2 (what isolates tenants);
    a per-load crc32c (the alternative guard) would read the same bytes once more."""
    from kvbm import ops

    nb = layout_of(mib).block_nbytes
    src = np.frombuffer(hashlib.shake_128(b"guard").digest(16) * (blocks * nb // 16), np.uint8)
    dst = np.empty_like(src)
    offs = np.arange(blocks, dtype=np.int64) * nb

    def best(fn) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    copy = best(lambda: ops.copy_blocks(src, offs, dst, offs, nb))
    crc = best(lambda: ops.crc32c_blocks(src, offs, nb))
    gb = blocks * nb / 1e9
    return {"blocks": blocks, "block_bytes": nb, "copy_gbps": round(gb / copy, 2), "crc32c_gbps": round(gb / crc, 2),
            "crc_over_copy": round(crc / copy, 3), "native": ops.HAVE_NATIVE if hasattr(ops, "HAVE_NATIVE") else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["load", "local", "guard", "nixl", "all"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--ops", type=int, default=10_000)
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--mib", type=float, default=1.0, help="block size in MiB (via num_layers)")
    ap.add_argument("--rounds", type=int, default=5, help="nixl: pulls (and bare READs) per run")
    ap.add_argument("--ab", default="", metavar="DIR", help="nixl: a folder of kvbm.daemon modules (e.g. an "
                    "older peering.py) that a second daemon pair runs, pulls alternating with this code's")
    ap.add_argument("--trace", action="store_true", help="nixl: per round, the pull's phases and each "
                                                         "daemon thread's CPU seconds")
    args = ap.parse_args()
    if args.ab and not Path(args.ab).is_dir():
        print(f"bench_daemon.py: --ab {args.ab!r} is not a folder; give one holding kvbm/daemon modules "
              f"(e.g. git show HEAD:kvbm/daemon/peering.py > DIR/peering.py)", file=sys.stderr)
        return 2
    if min(args.rounds, args.blocks, args.clients, args.ops) < 1 or args.mib <= 0:
        print("bench_daemon.py: --rounds, --blocks, --clients and --ops must be >= 1 and --mib > 0", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kvbm-bench-") as tmp:
        work = Path(tmp)
        out = {}
        if args.what in ("load", "all"):
            out["load"] = bench_load(work, args.clients, args.ops)
        if args.what in ("local", "all"):
            out["local"] = bench_local(work, args.blocks, args.mib)
        if args.what in ("guard", "all"):
            out["guard"] = bench_guard(args.blocks, args.mib)
        if args.what in ("nixl", "all"):
            from daemon_nixl import bench_nixl  # (its own file: it needs nixl)

            out["nixl"] = bench_nixl(work, args.blocks, args.mib, args.rounds, args.trace, args.ab)
    print(json.dumps(out, indent=2), flush=True)
    if "nixl" in out:  # nixl 1.5.1's teardown at interpreter exit can segfault: skip it
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
