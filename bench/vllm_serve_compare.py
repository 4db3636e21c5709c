"""What kvbm buys a `vllm serve` user: TTFT under a trace slice whose working set exceeds vLLM's KV pool.

    python bench/vllm_serve_compare.py                      # all five configs, markdown table
    python bench/vllm_serve_compare.py --configs a,b --json out.json
    python bench/vllm_serve_compare.py --configs c,e,c,e     # alternate A/B runs: compare ratios

The slice (bench/data/mooncake_sessions.jsonl, made by --make-slice from the bundled Mooncake
trace): the turns of the first multi-turn conversations, in arrival order, prompts cut to
--max-input tokens (the tiny model's context), outputs capped at --max-output tokens, arrival
times divided by --speed. Every config replays the same slice with kvbm.loadgen (streaming
/v1/completions, TTFT = first token) against the CPU build of vLLM 0.32 (multiprocessing on,
tiny dummy-weight Llama, 128-token blocks, vLLM's own prefix cache on, its pool cut to
--pool blocks with --num-gpu-blocks-override):

    a   vLLM alone
    b   + kvbm G2 (host, --g2 blocks) through the connector's in-process config (under vLLM's
        multiprocessing executor: the engine's own kvbm daemon)
    c   + kvbm G2 (--g2-small blocks) + G3 (disk, --g3 blocks)
    d   two engines sharing one `kvbm serve` (G2 --g2-small + G3 --g3), the slice split between
        them by conversation, both halves at once
    e   c in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0: the in-process BlockManager, no daemon)
    f   e's one process with the daemon backend (kvbm_daemon: a `kvbm serve` with c's G2 + G3): the
        same executor as e, so f vs e is the daemon backend's own cost
    g   a in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0): g vs a is vLLM's executor's cost
    h   f with KVBM_LANE_OMP_TEAM=0 (the daemon backend as before session 8: its load lane holds no
        OpenMP team, so the engine's OpenMP threads spin at every wait; h vs f is that fix)

Reported per config: TTFT p50/p99, E2E p50, completed/failed, kvbm hit tokens (vLLM's
external_prefix_cache_hits) and vLLM's own prefix-cache hit tokens, from the servers' /metrics
over the run; CPU seconds of vLLM's processes and kvbm's daemons, and per thread (`tids`: CPU
seconds, voluntary and involuntary context switches: a thread that burns CPU with few voluntary
switches spins while it waits).

    --model medium   a dummy Llama of hidden 512, MLP 2048, 8 heads (tiny: 256, 512, 4); the same KV
                     layout (kvbm moves the same bytes per block): recompute costs several times more
    --env NAME=VALUE set in every config's servers alike. vLLM's CPU build reserves a core for its
                     engine core, and one more when a kv_transfer_config is given; on 2 cores the
                     second cannot be had, so configs with a connector get no reservation: their
                     worker computes on 2 OpenMP threads where vLLM alone gets 1.
                     --env VLLM_CPU_NUM_OF_RESERVED_CPU=1 gives every config vLLM alone's layout. vLLM's OffloadingConnector is not run: its worker needs CUDA (it refuses on the
CPU build); LMCache is not installed here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
SLICE = HERE / "data" / "mooncake_sessions.jsonl"
MODELS = {  # tiny: tests/vllm_e2e.py's; medium: more compute per token, the same KV layout
    "tiny": {},
    "medium": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8},
}
CONFIGS = {"a": "vLLM alone", "b": "+ kvbm G2", "c": "+ kvbm G2 + G3", "d": "2 engines, 1 kvbm daemon",
           "e": "+ kvbm G2 + G3, one process", "f": "+ kvbm daemon G2 + G3, one process",
           "g": "vLLM alone, one process", "h": "f without the lane's OpenMP team"}


def make_slice(sessions: int, path: Path) -> None:
    """The turns of the first `sessions` multi-turn conversations of the bundled Mooncake trace."""
    from collections import defaultdict

    from kvbm.sim.traces import Trace, load_trace, write_trace

    trace = load_trace(HERE.parent / "kvbm" / "sim" / "data" / "mooncake_conversation.jsonl", limit=3000)
    turns = defaultdict(list)
    for r in trace.requests:
        if len(r.hash_ids) > 1:
            turns[r.hash_ids[1]].append(r)  # a conversation: its turns share the block after the system prompt
    chosen = [v for v in turns.values() if len(v) >= 2][:sessions]
    keep = sorted((r for v in chosen for r in v), key=lambda r: r.timestamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_trace(Trace(keep, trace.block_size, "mooncake"), path)


def session_of(r) -> int:
    return r.hash_ids[1] if len(r.hash_ids) > 1 else r.hash_ids[0]


def _processes() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, command line) of every process we can read."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def cpu_split(roots: list[int], runtime: str = "") -> dict[str, float]:
    """CPU seconds so far of the process trees under roots: vLLM's processes, and kvbm daemons
    among them or among roots (a `kvbm serve`), and engine daemons whose files are under
    `runtime` (an engine's own daemon detaches: it is no process's child)."""
    procs = _processes()
    roots = list(roots) + [pid for pid, (_, _, cmd) in procs.items()
                           if runtime and "kvbm.connectors.engine_daemon" in cmd and f" {runtime}/" in cmd]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out = {"vllm_cpu_s": 0.0, "kvbm_daemon_cpu_s": 0.0}
    todo, seen = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        _, cpu, cmd = procs[pid]
        daemon = "kvbm.connectors.engine_daemon" in cmd or "kvbm.cli serve" in cmd
        out["kvbm_daemon_cpu_s" if daemon else "vllm_cpu_s"] += cpu
        todo += children.get(pid, [])
    return out


def engine_daemons(runtime: str) -> list[int]:
    """pids of the engine daemons whose files are under runtime (they detach from the server)."""
    return [pid for pid, (_, _, cmd) in _processes().items()
            if runtime and "kvbm.connectors.engine_daemon" in cmd and f" {runtime}/" in cmd]


def _tree(roots: list[int]):
    """Every pid of the process trees at roots (each once)."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
        yield pid


def thread_cpu(roots: list[int]) -> dict[str, float]:
    """CPU seconds so far of every thread under the process trees at roots, by thread name."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in _tree(roots):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
            except OSError:
                continue
            fields = rest.split()
            name = head.split("(", 1)[1]
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def tid_stats(roots: list[int]) -> dict[str, list]:
    """Per thread under the process trees at roots: "process comm/tid" -> [thread name, CPU seconds,
    voluntary and involuntary context switches so far]. A thread that never sleeps while it waits
    (a spin) shows CPU with few voluntary switches."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in _tree(roots):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
            with open(f"/proc/{pid}/comm") as f:
                pcomm = f.read().strip()
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
            except (OSError, ValueError):
                continue
            fields = rest.split()
            out[f"{pcomm}/{tid}"] = [head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / tick,
                                     int(status.get("voluntary_ctxt_switches", 0)),
                                     int(status.get("nonvoluntary_ctxt_switches", 0))]
    return out


def tid_delta(before: dict, after: dict, top: int = 16) -> dict[str, list]:
    """The threads that ran most between two tid_stats: name -> [thread name, CPU s, voluntary,
    involuntary switches over the interval]."""
    rows = {}
    for k, (name, cpu, vol, invol) in after.items():
        b = before.get(k, [name, 0.0, 0, 0])
        rows[k] = [name, round(cpu - b[1], 2), vol - b[2], invol - b[3]]
    return dict(sorted(rows.items(), key=lambda kv: -kv[1][1])[:top])


def read_probe(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def replay(servers, traces, args):
    """Replay traces[i] against servers[i], all at once; (merged results, wall seconds, metric deltas)."""
    from kvbm.loadgen.prompts import trace_jobs
    from kvbm.loadgen.sender import send_all

    before = [s.metrics() for s in servers]
    results: list = [None] * len(servers)

    def run(i):
        jobs = trace_jobs(traces[i], args.speed, 1000, args.max_input, args.max_output)
        results[i] = send_all(servers[i].url, servers[i].model, jobs, timeout=1800)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    delta: dict[str, float] = {}
    for s, b in zip(servers, before):
        for k, v in s.metrics().items():
            delta[k] = delta.get(k, 0.0) + v - b.get(k, 0.0)
    return [r for rs in results for r in rs], wall, delta


def run_config(name: str, args, work: Path) -> dict:
    from kvbm.loadgen.report import summarize
    from kvbm.sim.traces import Trace, load_trace
    from vllm_serve_helpers import BLOCK, CONFIG, KvbmServe, Server, prompt, write_model
    from vllm_serve_helpers import kv_config as _kv_config

    work = work / name
    work.mkdir()
    (work / "run").mkdir(mode=0o700)
    model_cfg = {**CONFIG, **MODELS[args.model]}
    model = write_model(work, model_cfg)
    env = {**args.env, "KVBM_RUNTIME_DIR": str(work / "run")}
    probe = work / "probe.json"
    if args.probe:  # bench/vllm_step_probe.py: engine steps, empty steps, load waits (one-process configs)
        env = {**env, "KVBM_PROBE_OUT": str(probe),
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def kv_config(extra):
        cfg = _kv_config(extra)
        return {**cfg, "kv_connector_module_path": "vllm_step_probe"} if args.probe else cfg
    pool = ("--num-gpu-blocks-override", str(args.pool))
    g2 = {"name": "g2", "capacity": args.g2, "storage": {"name": "host", "pin": "never"}}
    g2s = {**g2, "capacity": args.g2_small}
    g3 = {"name": "g3", "capacity": args.g3, "storage": {"name": "disk", "path": str(work / "g3")}}
    daemon = None
    layout = {"num_layers": model_cfg["num_hidden_layers"], "num_kv_heads": model_cfg["num_key_value_heads"],
              "head_dim": model_cfg["head_dim"], "block_size": BLOCK, "dtype": "bfloat16"}
    if name in ("e", "f", "g", "h"):  # engine core and worker in the API server's process
        env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if name == "h":
        env = {**env, "KVBM_LANE_OMP_TEAM": "0"}
    if name in ("a", "g"):
        servers = [Server(work, model, args=pool, env=env, name=name)]
    elif name in ("f", "h"):
        daemon = KvbmServe(work, layout, g2=args.g2_small, g3=args.g3).start()
        servers = [Server(work, model, kv=kv_config(daemon.extra()), args=pool, env=env, name=name)]
    elif name in ("b", "c", "e"):
        tiers = [g2] if name == "b" else [g2s, g3]
        servers = [Server(work, model, kv=kv_config({"kvbm_config": {"tiers": tiers}}), args=pool, env=env,
                          name=name)]
    else:
        daemon = KvbmServe(work, layout, g2=args.g2_small, g3=args.g3).start()
        servers = [Server(work, model, kv=kv_config(daemon.extra()), args=pool, env=env, name=f"d{i}")
                   for i in range(2)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait()
            s.complete(prompt(99, 300), max_tokens=2)  # warm-up, not measured
        trace = load_trace(args.trace)
        if args.limit:
            trace = Trace(trace.requests[:args.limit], trace.block_size, "mooncake")
        if name == "d":
            halves = [Trace([r for r in trace.requests if session_of(r) % 2 == i], trace.block_size, "mooncake")
                      for i in range(2)]
            traces = halves
        else:
            traces = [trace]
        roots = [s.proc.pid for s in servers] + ([daemon.proc.pid] if daemon is not None else [])
        time.sleep(2.0 if args.probe else 0.0)  # the probe's file: after the warm-up's steps
        droots = roots + engine_daemons(env["KVBM_RUNTIME_DIR"])
        cpu0, th0, probe0 = cpu_split(roots, env["KVBM_RUNTIME_DIR"]), thread_cpu(roots), read_probe(probe)
        tid0 = tid_stats(droots)
        since = time.time()
        results, wall, delta = replay(servers, traces, args)
        cpu = {k: round(v - cpu0[k], 1) for k, v in cpu_split(roots, env["KVBM_RUNTIME_DIR"]).items()}
        th = {k: round(v - th0.get(k, 0.0), 2) for k, v in thread_cpu(roots).items()}
        cpu["threads_cpu_s"] = dict(sorted(((k, v) for k, v in th.items() if v >= 0.05), key=lambda kv: -kv[1]))
        cpu["tids"] = tid_delta(tid0, tid_stats(droots))  # [name, CPU s, voluntary, involuntary switches]
        if args.probe:
            time.sleep(2.0)
            probe1 = read_probe(probe)
            cpu["probe"] = {k: round(v - probe0.get(k, 0), 4) for k, v in probe1.items()
                            if isinstance(v, (int, float))}
            from vllm_step_probe import phases  # per request: where each hit's time went

            cpu["probe"]["phases"] = phases(probe1.get("timeline", {}), since)
            if args.timeline:  # every request's points and every step, for a closer look
                Path(args.timeline).parent.mkdir(parents=True, exist_ok=True)
                with open(args.timeline, "a") as f:
                    f.write(json.dumps({"config": name, "since": since, "timeline": probe1.get("timeline", {}),
                                        "steps": probe1.get("steps_t", []),
                                        "client": [[r.sent, r.ttft] for r in results]}) + "\n")
    finally:
        for s in servers:
            s.stop()
        if daemon is not None:
            daemon.stop()
    rep = summarize(results, wall)
    return {"config": name, "label": CONFIGS[name], "requests": rep["requests"], "completed": rep["completed"],
            "failed": rep["failed"], "ttft_p50_s": rep["ttft_s"]["p50"], "ttft_p99_s": rep["ttft_s"]["p99"],
            "e2e_p50_s": rep["e2e_s"]["p50"], "wall_s": wall,
            "kvbm_hit_tokens": delta.get("vllm:external_prefix_cache_hits", 0.0),
            "vllm_hit_tokens": delta.get("vllm:prefix_cache_hits", 0.0),
            "prompt_tokens_queried": delta.get("vllm:prefix_cache_queries", 0.0), "errors": rep["errors"],
            "model": args.model, "env": args.env,
            **cpu}  # CPU seconds over the replay: vLLM's processes, kvbm daemons


def table(rows: list[dict]) -> str:
    base = next((r["ttft_p50_s"] for r in rows if r["config"] == "a"), None)
    out = ["| config | requests (failed) | TTFT p50 (s) | TTFT p99 (s) | vs a | E2E p50 (s) | kvbm hit tokens "
           "| vLLM prefix-cache hit tokens | prompt tokens | CPU s: vLLM, kvbm daemon | load avg (start, end) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['ttft_p50_s'] / base:.2f}x" if base and r["ttft_p50_s"] else "-"
        out.append(f"| {r['config']}: {r['label']} | {r['completed']} ({r['failed']}) | {r['ttft_p50_s']:.3f} | "
                   f"{r['ttft_p99_s']:.3f} | {ratio} | {r['e2e_p50_s']:.3f} | {r['kvbm_hit_tokens']:.0f} | "
                   f"{r['vllm_hit_tokens']:.0f} | {r['prompt_tokens_queried']:.0f} | "
                   f"{r.get('vllm_cpu_s', '-')}, {r.get('kvbm_daemon_cpu_s', '-')} | {r.get('load_avg', '-')} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="a,b,c,d,e")
    ap.add_argument("--trace", default=str(SLICE))
    ap.add_argument("--make-slice", type=int, metavar="SESSIONS", help="write the slice of N conversations, exit")
    ap.add_argument("--speed", type=float, default=10.0, help="arrival times divided by this (default 10)")
    ap.add_argument("--max-input", type=int, default=3968, help="prompt tokens (default 3968: 31 blocks)")
    ap.add_argument("--max-output", type=int, default=8)
    ap.add_argument("--pool", type=int, default=64, help="vLLM's KV pool in 128-token blocks (default 64)")
    ap.add_argument("--g2", type=int, default=4096, help="kvbm G2 blocks in config b (default 4096)")
    ap.add_argument("--g2-small", type=int, default=256, help="kvbm G2 blocks in configs c, d (default 256)")
    ap.add_argument("--g3", type=int, default=4096, help="kvbm G3 blocks in configs c, d (default 4096)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--probe", action="store_true",
                    help="count engine steps, empty steps and load waits (bench/vllm_step_probe.py)")
    ap.add_argument("--timeline", help="with --probe: append each config's per-request timeline and steps "
                                       "(one JSON line per config) to this file")
    ap.add_argument("--limit", type=int, default=0, help="replay only the first N requests of the slice")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny",
                    help="dummy Llama: tiny (tests/vllm_e2e.py) or medium (hidden 512, MLP 2048, 8 heads: more "
                         "the compute per token, the same KV bytes per block)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in every config's servers alike (e.g. OMP_WAIT_POLICY=passive); repeatable")
    args = ap.parse_args()
    env = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            ap.exit(2, f"--env takes NAME=VALUE, got {item!r}\n")
        env[name] = value
    args.env = env
    bad = [c for c in args.configs.split(",") if c not in CONFIGS]
    if bad:
        ap.exit(2, f"unknown config {bad[0]!r}: --configs takes letters from {','.join(CONFIGS)}\n")
    if args.make_slice:
        make_slice(args.make_slice, Path(args.trace))
        print(f"wrote {args.trace}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbm-serve-bench-") as tmp:
        for i, name in enumerate(args.configs.split(",")):  # a name may repeat: alternate A/B runs
            print(f"[{name}] {CONFIGS[name]} ...", file=sys.stderr, flush=True)
            (Path(tmp) / str(i)).mkdir()
            load0 = os.getloadavg()[0]
            rows.append(run_config(name, args, Path(tmp) / str(i)))
            rows[-1]["load_avg"] = [round(load0, 1), round(os.getloadavg()[0], 1)]  # at start, at end
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
