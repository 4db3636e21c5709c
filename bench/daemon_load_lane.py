"""A load behind stores, through the connector's daemon backend: one lane (before) vs two (now).

    python bench/daemon_load_lane.py [--rounds 20] [--stores 4] [--blocks 31] [--json]

A `kvbm serve` daemon (G2 only) with the tiny vLLM model's layout of bench/vllm_serve_compare.py
(128-token bf16 blocks, 128 KiB each). Per round: a worker's step submits --stores stores of
--blocks new blocks each, then a load of --blocks blocks already in G2 (a prefix hit, what
TTFT waits on); timed from the load's submission to its completion. Rounds alternate between

    one lane   DaemonBackend as before: loads and stores on one thread and one client session
    two lanes  DaemonBackend now: loads on their own thread and client, stores on another

so both see the same machine load; the ratio of the medians is the figure, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="rounds per mode, alternating (default 20)")
    ap.add_argument("--stores", type=int, default=4, help="stores submitted before each load (default 4)")
    ap.add_argument("--blocks", type=int, default=31, help="blocks per store and per load (default 31)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from kvbm.blocks import KVLayout
    from kvbm.connectors.core import DaemonBackend
    from vllm_e2e import BLOCK, CONFIG
    from vllm_serve_helpers import KvbmServe

    class OneLane(DaemonBackend):
        """The design before: loads queue on the stores' thread and client."""

        def __init__(self, client, **_):
            super().__init__(client, store_client=client)

        def start_load(self, keys, staging):
            return self._stores.submit(self.client.load, list(keys), list(staging))

    layout = {"num_layers": CONFIG["num_hidden_layers"], "num_kv_heads": CONFIG["num_key_value_heads"],
              "head_dim": CONFIG["head_dim"], "block_size": BLOCK, "dtype": "bfloat16"}
    work = Path(tempfile.mkdtemp(prefix="kvbm-lane-"))
    g2 = 2 * args.rounds * (args.stores + 1) * args.blocks + 64
    daemon = KvbmServe(work, layout, g2=g2).start()
    modes = {"one lane": OneLane, "two lanes": DaemonBackend}
    lat: dict[str, list[float]] = {m: [] for m in modes}
    try:
        backends = {m: cls.connect(daemon.address, KVLayout(**layout), "tiny", token=daemon.token)
                    for m, cls in modes.items()}
        nb = backends["two lanes"].block_nbytes
        rows = [np.full(nb, i % 251, np.uint8) for i in range(args.blocks)]
        hot = [uuid.uuid4().bytes for _ in range(args.blocks)]
        t = backends["two lanes"].start_store(hot, rows)
        assert t.result(60) == args.blocks
        out = [np.zeros(nb, np.uint8) for _ in range(args.blocks)]
        for r in range(args.rounds):
            for m in (modes if r % 2 == 0 else reversed(list(modes))):
                b = backends[m]
                stores = [b.start_store([uuid.uuid4().bytes for _ in range(args.blocks)], rows)
                          for _ in range(args.stores)]
                t0 = time.perf_counter()
                load = b.start_load(hot, out)
                assert load.result(120) == args.blocks
                lat[m].append(time.perf_counter() - t0)
                for s in stores:
                    s.result(120)
        assert all(np.array_equal(o, row) for o, row in zip(out, rows))
        for b in backends.values():
            b.close()
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    res = {m: {"p50_ms": statistics.median(v) * 1e3, "p90_ms": sorted(v)[int(0.9 * len(v))] * 1e3}
           for m, v in lat.items()}
    ratio = res["two lanes"]["p50_ms"] / res["one lane"]["p50_ms"]
    if args.json:
        print(json.dumps({"args": vars(args), "results": res, "two_over_one_p50": ratio,
                          "load_avg": os.getloadavg()[0]}))
    else:
        print(f"load of {args.blocks} blocks submitted behind {args.stores} stores of {args.blocks}, "
              f"{args.rounds} rounds per mode (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        for m, r in res.items():
            print(f"  {m:<10} p50 {r['p50_ms']:8.1f} ms   p90 {r['p90_ms']:8.1f} ms")
        print(f"  two lanes / one lane (p50): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
