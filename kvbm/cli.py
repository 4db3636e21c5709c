"""The `kvbm` command.

    kvbm demo [--requests N] [--json]   real bytes over G2/G3/G4, every onboarded block verified
    kvbm simulate TRACE [--tier g2=10000[:EVICTION[:ADMISSION]] ...] [--json] [--sweep CAPS --policy NAMES] [--plot PNG]
    kvbm policies            list registered eviction and admission policies
    kvbm config check FILE   what serve / simulate run on a config file, without side effects

Errors: bad input ends in one line `kvbm: error: ...` naming the key, path or port and what
to do, exit status 2, no traceback. Output cut short by a closed pipe (`kvbm ... | head`) ends
quietly with status 141, as a command killed by SIGPIPE would.
    kvbm serve --config kvbm.yaml        the node's cache daemon (G2 shared with its clients)
    kvbm stats [--address A] [--json]    ask a running daemon for its counters

TRACE is a path (Mooncake/Bailian JSONL, Parquet) or `mooncake` for the bundled trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

BUNDLED = {"mooncake": Path(__file__).parent / "sim" / "data" / "mooncake_conversation.jsonl"}

# Layouts of common models (per rank, tp=1); the block size comes from the trace.
LAYOUT_PRESETS = {
    "llama3-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "llama3-70b": dict(num_layers=80, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "qwen2.5-7b": dict(num_layers=28, num_kv_heads=4, head_dim=128, dtype="bfloat16"),
    "deepseek-v3": dict(num_layers=61, num_kv_heads=1, head_dim=576, dtype="bfloat16", kv_factor=1),
}


class UsageError(ValueError):
    pass


class Parser(argparse.ArgumentParser):
    """A bad command line is one line too (argparse prints its usage first): what was wrong
    and where the options are listed."""

    def error(self, message: str):
        self.exit(2, f"kvbm: error: {message}; see `{self.prog} --help`\n")


def parse_tier(spec: str, layout) -> Any:
    """'g2=10000:lru[:admission]' -> TierConfig (capacity in blocks or bytes with a unit); an
    eviction left out is the config's default for the tier's place (eviction None here: auto on
    every tier, which runs lru below the first; filled in by KVBMConfig), an admission left out `always`."""
    from .config import DEFAULT_ADMISSION, ConfigError, PolicySpec, TierConfig, parse_capacity
    from .tiers.base import TIER_NAMES

    name, eq, rest = spec.partition("=")
    if not eq or not rest:
        raise UsageError(f"--tier {spec!r}: write NAME=CAPACITY[:EVICTION[:ADMISSION]], e.g. g2=10000:lru")
    name = name.strip().lower()
    if name not in TIER_NAMES:
        raise UsageError(f"--tier {spec!r}: tier must be one of {', '.join(TIER_NAMES)}, got {name!r}")
    parts = rest.split(":")
    if len(parts) > 3:
        raise UsageError(f"--tier {spec!r}: too many ':' fields; NAME=CAPACITY[:EVICTION[:ADMISSION]]")
    try:
        capacity = parse_capacity(parts[0], layout, f"--tier {name} capacity")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    eviction = PolicySpec(parts[1]) if len(parts) > 1 and parts[1] else None
    admission = parts[2] if len(parts) > 2 and parts[2] else DEFAULT_ADMISSION
    return TierConfig(name, capacity, eviction, PolicySpec(admission))


def parse_layout(spec: str | None, block_size: int):
    from .blocks import KVLayout

    if spec is None:
        return None
    if spec in LAYOUT_PRESETS:
        return KVLayout(block_size=block_size, **LAYOUT_PRESETS[spec])
    from .hybrid_presets import HYBRID_PRESETS, hybrid_manifest

    if spec in HYBRID_PRESETS:  # one page holds every KV cache group's piece
        return hybrid_manifest(spec, block_size).layout()
    fields: dict[str, Any] = {}
    aliases = {"layers": "num_layers", "kv_heads": "num_kv_heads", "heads": "num_kv_heads"}
    for item in spec.split(","):
        k, eq, v = item.partition("=")
        if not eq:
            raise UsageError(
                f"--layout {spec!r}: use a preset ({', '.join([*LAYOUT_PRESETS, *HYBRID_PRESETS])}) or "
                f"layers=32,kv_heads=8,head_dim=128,dtype=bfloat16"
            )
        k = aliases.get(k.strip(), k.strip())
        fields[k] = v.strip() if k == "dtype" else _int(v, f"--layout {k}")
    fields.setdefault("block_size", block_size)
    try:
        return KVLayout(**fields)
    except TypeError as exc:
        raise UsageError(f"--layout: {exc}") from None


def _int(v: str, where: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"{where}: expected an integer, got {v!r}") from None


def _capacities(text: str) -> list[int]:
    caps = []
    for item in text.split(","):
        item = item.strip().replace("_", "")
        if item.lower().endswith("k"):
            item = str(int(float(item[:-1]) * 1000))
        c = _int(item, "--sweep")
        if c <= 0:
            raise UsageError(f"--sweep: capacities must be positive block counts, got {c}")
        caps.append(c)
    return caps


def cmd_simulate(args: argparse.Namespace) -> int:
    from .config import KVBMConfig, load_config
    from .registry import EVICTION
    from .sim.replay import simulate, sweep
    from .sim.traces import load_trace

    if args.plot:
        try:  # fail before a long sweep, not after it
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'kvbm-tiered[plot]'") from None
    path = trace_path(args.trace)
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be a positive number of requests, got {args.limit}")
    trace = load_trace(path, format=args.format, limit=args.limit)
    if not trace.requests:
        raise UsageError(f"{path}: the trace has no requests, nothing to replay; give a trace with "
                         f"one JSON object per line (see kvbm/sim/data/README.md for the format)")
    layout = parse_layout(args.layout, trace.block_size)
    base = load_config(args.config) if args.config else None
    layout = layout or (base.layout if base else None)
    if args.tier:
        tiers = [_tier_dict(parse_tier(spec, layout)) for spec in args.tier]
    elif base is not None:
        tiers = [_tier_dict(t) for t in base.tiers]
    else:
        tiers = [{"name": "g2", "capacity": 10000}]  # the config's default eviction (auto)
    # Order, duplicates and names are validated by the same code as config files.
    config = KVBMConfig.from_dict({
        "tiers": tiers,
        "mode": args.mode or (base.mode if base else "exclusive"),
        "promote_on_hit": args.promote if args.promote is not None else (base.promote_on_hit if base else True),
    })
    config.layout = layout

    if args.sweep or args.policy:
        caps = _capacities(args.sweep) if args.sweep else [config.tiers[0].capacity]
        policies = [p.strip() for p in (args.policy or config.tiers[0].eviction.name).split(",") if p.strip()]
        for p in policies:
            EVICTION.get(p)  # fail before forking workers, with the list of names
        rows = sweep(trace, policies, caps, base=config, jobs=args.jobs, progress=not args.quiet,
                     offload=args.offload)
        if args.json:
            print(json.dumps({"trace": str(path), "requests": len(trace.requests),
                              "block_accesses": trace.block_accesses, "sweep": rows}, indent=2))
        else:
            _print_sweep(rows, policies, caps, trace)
        if args.plot:
            from .sim.plot import plot_sweep

            plot_sweep(rows, args.plot, title=f"{Path(str(path)).name}: prefix hit ratio vs capacity")
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0

    result = simulate(trace, config, progress=not args.quiet, offload=args.offload)
    out = result.to_dict()
    out["trace"] = str(path)
    if config.layout is not None:
        out["block_nbytes"] = config.layout.block_nbytes
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_result(out)
    return 0


def _tier_dict(t) -> dict[str, Any]:
    return {"name": t.name, "capacity": t.capacity,
            **({"eviction": {"name": t.eviction.name, **t.eviction.options}} if t.eviction is not None else {}),
            "admission": {"name": t.admission.name, **t.admission.options},
            "storage": {"name": t.storage.name, **t.storage.options},
            **({"headroom": t.headroom} if t.headroom is not None else {})}


def _print_result(out: dict[str, Any]) -> None:
    print(f"trace            {out['trace']}")
    print(f"requests         {out['requests']:,}")
    print(f"block accesses   {out['block_accesses']:,}")
    print(f"block hit ratio  {out['block_hit_ratio']:.4f}")
    print(f"prefix hit ratio {out['prefix_hit_ratio']:.4f}")
    print(f"replay           {out['seconds']:.2f} s ({out['accesses_per_second']:,.0f} accesses/s)")
    offload = out.get("config", {}).get("offload")
    if offload:
        print("offload          headroom kept free by early demotion: "
              + ", ".join(f"{name} {n:,} blocks" for name, n in offload.items()))
    cols = ["capacity", "used", "policy", "block_hits", "prefix_hits", "stores", "evictions",
            "demotions_in", "promotions_out", "drops", "rejected"]
    print()
    print("tier " + " ".join(f"{c:>14}" for c in cols))
    for name, st in out["tiers"].items():
        print(f"{name:<4} " + " ".join(f"{st[c]:>14,}" if isinstance(st[c], int) else f"{st[c]:>14}" for c in cols))


def _print_sweep(rows, policies, caps, trace) -> None:
    by = {(r["policy"], r["capacity"]): r for r in rows}
    for metric in ("prefix_hit_ratio", "block_hit_ratio"):
        print(f"\n{metric} ({len(trace.requests):,} requests, {trace.block_accesses:,} block accesses)")
        print(f"{'policy':<12}" + "".join(f"{c:>10,}" for c in caps))
        for p in policies:
            print(f"{p:<12}" + "".join(f"{by[(p, c)][metric]:>10.4f}" for c in caps))


def cmd_policies(args: argparse.Namespace) -> int:
    from .registry import ADMISSION, EVICTION

    for title, reg in (("eviction", EVICTION), ("admission", ADMISSION)):
        print(f"{title}:")
        for name in reg.names():
            try:
                cls = reg.get(name)
                doc = (cls.__module__ and (sys.modules[cls.__module__].__doc__ or "")).strip().splitlines()
                line = doc[0] if doc else ""
                if getattr(cls, "simulation_only", False):
                    line += " [simulation only]"
            except Exception as exc:  # a broken third-party plugin must not hide the others
                line = f"(cannot load: {exc})"
            print(f"  {name:<16} {line}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .daemon.config import load_daemon_config

    # What `kvbm serve` reads (the manager's keys and the daemon: section, KVBM_... overrides,
    # every tier resolved as serve and simulate resolve it: kvbm.config.parse_config), opening
    # nothing: no file, no shared memory, no socket.
    cfg, _ = load_daemon_config(args.file)
    tiers = [f"{t.name}={t.capacity} blocks:{t.eviction.name}"
             + (f" (headroom {t.offload_headroom})" if i < len(cfg.tiers) - 1 and t.offload_headroom else "")
             for i, t in enumerate(cfg.tiers)]
    print(f"{args.file}: ok ({cfg.mode}, " + ", ".join(tiers) + ")")
    return 0


def trace_path(name: str) -> Path:
    """A bundled trace by name, or a file that exists."""
    path = BUNDLED.get(name, Path(name))
    if not path.is_file():
        raise UsageError(f"trace file not found: {name}; give a trace file (Mooncake/Bailian JSONL, "
                         f"Parquet) or a bundled trace by name: {', '.join(BUNDLED)}")
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import print_report, run_demo

    for name in ("requests", "g2", "g3", "g4"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    report = run_demo(trace_path(args.trace), requests=args.requests, g2=args.g2, g3=args.g3,
                      g4=args.g4, workdir=args.workdir, keep=args.keep, eviction=args.policy,
                      progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 1 if report["mismatched_blocks"] else 0


def _need_daemon_deps(command: str, *modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pips = {"zmq": "pyzmq", "prometheus_client": "prometheus-client"}
        raise UsageError(f"kvbm {command} needs {', '.join(missing)}: pip install "
                         + " ".join(pips.get(m, m) for m in missing))


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import os

    from .config import config_env

    if not args.config and not os.environ.get("KVBM_CONFIG") and not any(
            v.startswith("KVBM_TIERS__") for v in config_env(os.environ)):
        raise UsageError("kvbm serve needs a config: kvbm serve --config kvbm.yaml (tiers, layout and a "
                         "`daemon:` section; see README, Cache daemon), or set KVBM_CONFIG")
    _need_daemon_deps("serve", "zmq", "msgpack", "prometheus_client")
    from .daemon.config import load_daemon_config
    from .daemon.server import serve

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s kvbm %(levelname)s %(message)s")
    cfg, dcfg = load_daemon_config(args.config)
    _raise_nofile()
    return serve(cfg, dcfg)


def _raise_nofile(most: int = 1 << 20) -> None:
    """The daemon's soft RLIMIT_NOFILE up to its hard limit (as nginx and most servers do): every
    client, event subscriber, G3 file and G4 socket holds a descriptor, and libzmq aborts the
    process when an ipc:// accept finds none left, so a flood of connections has to outrun the
    event sockets' gate by the whole hard limit, not by the distribution's soft default (1,024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = most if hard == resource.RLIM_INFINITY else min(hard, most)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, OSError, ValueError):
        pass  # keep the limit the daemon was given


def cmd_stats(args: argparse.Namespace) -> int:
    import os

    _need_daemon_deps("stats", "zmq", "msgpack")
    import zmq

    from .daemon.protocol import pack, unpack

    address, token = args.address, args.token or os.environ.get("KVBM_DAEMON__TOKEN", "")
    if args.config:
        from .daemon.config import load_daemon_config

        _, dcfg = load_daemon_config(args.config)
        address, token = address or dcfg.address, token or dcfg.token
    address = address or __import__("kvbm.daemon.transport", fromlist=["x"]).default_address()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(pack({"op": "stats", "id": 1, **({"auth": token} if token else {})}))
        if not sock.poll(int(args.timeout * 1000)):
            raise UsageError(f"no kvbm daemon answered at {address} within {args.timeout}s")
        reply = unpack(sock.recv(), 1 << 22)
    finally:
        sock.close(0)
        ctx.term()
    if not reply.get("ok"):
        raise UsageError(f"daemon at {address} refused: {reply.get('message')}")
    st = reply["stats"]
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if "tenant" in st:  # a named tenant's token: its own counters only (server.op_stats)
        print(f"kvbm daemon at {address}: tenant {st['tenant']}: {_tenant_line(st)}")
        return 0
    d = st["daemon"]
    print(f"kvbm daemon at {address}: {d['clients']} clients, up {d['uptime_seconds']:.0f}s, "
          f"prefix hit ratio {d['prefix_hit_ratio']:.3f} ({d['prefix_hit_blocks']}/{d['lookup_blocks']} blocks)")
    for name, t in st["tiers"].items():
        print(f"  {name:3} {t['medium']:6} {t['used']:>9}/{t['capacity']:<9} hits {t['hits']:<9} stores "
              f"{t['stores']:<9} evictions {t['evictions']:<8} io_errors {t['io_errors']} "
              f"checksum_errors {t['checksum_errors']}")
    for path, p in st["transfers"].items():
        rate = f"{p['gb_per_s']:.2f} GB/s" if p["gb_per_s"] else "-"
        print(f"  {path:14} {p['blocks']:>9} blocks {p['bytes'] / 1e9:10.3f} GB  {rate}")
    print(f"  requests {d['requests']}, bad {d['bad_requests']}, unauthorized {d['unauthorized']}, "
          f"lease expiries {d['lease_expiries']}, nixl {d['nixl'] or 'off'}")
    for name, row in (st.get("tenants") or {}).items():  # the operator's view: a row per tenant
        print(f"  tenant {name}: {_tenant_line(row)}")
    return 0


def _tenant_line(row: dict) -> str:
    blocks = ", ".join(f"{t} {n}" for t, n in (row.get("blocks") or {}).items()) or "none"
    return (f"{row.get('sessions', 0)} sessions, prefix hit ratio {row.get('prefix_hit_ratio', 0.0):.3f} "
            f"({row.get('prefix_hit_blocks', 0)}/{row.get('lookup_blocks', 0)} blocks), stored "
            f"{row.get('stored_blocks', 0)}, loaded {row.get('loaded_blocks', 0)}, pinned "
            f"{row.get('pinned_blocks', 0)}, busy {row.get('busy_blocks', 0)}/{row.get('busy_bound', '-')}; "
            f"blocks {blocks}")


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_EVICTION

    p = Parser(prog="kvbm", description="Tiered KV-cache block manager")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="replay a trace through the BlockManager (metadata only)")
    s.add_argument("trace", help="trace file (Mooncake/Bailian JSONL, Parquet) or 'mooncake' for the bundled one")
    s.add_argument("--format", choices=["mooncake", "bailian", "parquet"], help="override format autodetection")
    s.add_argument("--tier", action="append", metavar="NAME=CAP[:EVICT[:ADMIT]]",
                   help=f"a tier, fastest first, e.g. --tier g2=10000:lru --tier g3=100000:frequency; "
                        f"eviction left out: {DEFAULT_EVICTION} on every tier (below the first it runs lru); "
                        f"admission left out: always")
    s.add_argument("--config", help="a kvbm.yaml/.toml config (tiers from --tier replace its tiers)")
    s.add_argument("--layout", help=f"KV layout for byte capacities: {', '.join(LAYOUT_PRESETS)} or "
                                    "layers=32,kv_heads=8,head_dim=128,dtype=bfloat16")
    s.add_argument("--mode", choices=["exclusive", "inclusive"])
    s.add_argument("--promote", dest="promote", action="store_true", default=None, help="promote hits to the top tier (default)")
    s.add_argument("--no-promote", dest="promote", action="store_false")
    s.add_argument("--offload", action="store_true",
                   help="model the background offload the connectors and daemon run: keep each tier's "
                        "headroom (tiers[].headroom, default capacity/16) free by demoting early")
    s.add_argument("--sweep", metavar="CAPS", help="comma-separated top-tier capacities, e.g. 1000,10000,30000")
    s.add_argument("--policy", metavar="NAMES", help="comma-separated policies for the sweep, e.g. lru,fifo,arc")
    s.add_argument("--plot", metavar="PNG", help="with --sweep: draw prefix hit ratio vs capacity")
    s.add_argument("--jobs", type=int, help="parallel processes for --sweep (default: cores)")
    s.add_argument("--limit", type=int, help="replay only the first N requests")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("demo", help="real bytes over G2 host, G3 disk, G4 file:// objects, verified")
    d.add_argument("trace", nargs="?", default="mooncake", help="trace (default: the bundled Mooncake trace)")
    d.add_argument("--requests", type=int, default=1000, help="replay the first N requests (default 1000)")
    d.add_argument("--g2", type=int, default=500, help="G2 host capacity in blocks (default 500)")
    d.add_argument("--g3", type=int, default=2000, help="G3 disk capacity in blocks (default 2000)")
    d.add_argument("--g4", type=int, default=8000, help="G4 object-store capacity in blocks (default 8000)")
    d.add_argument("--policy", help=f"eviction policy of every tier (default: a config's, {DEFAULT_EVICTION} "
                                    f"on every tier, which runs lru on G3 and G4)")
    d.add_argument("--workdir", help="directory for G3 and G4 (default: a temporary one, removed after)")
    d.add_argument("--keep", action="store_true", help="keep the temporary directory")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    pl = sub.add_parser("policies", help="list registered policies")
    pl.set_defaults(func=cmd_policies)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config file")
    cc.add_argument("file")
    cc.set_defaults(func=cmd_config)

    sv = sub.add_parser("serve", help="run the node's cache daemon (G2 in shared memory, G3/G4, peers)")
    sv.add_argument("--config", help="kvbm.yaml with tiers, layout and a `daemon:` section (or $KVBM_CONFIG)")
    sv.add_argument("--verbose", action="store_true", help="log at INFO")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("stats", help="print a running daemon's counters")
    st.add_argument("--address", help="daemon address (default: from --config, else the default ipc://$XDG_RUNTIME_DIR/kvbm/kvbm.sock)")
    st.add_argument("--config", help="read the address and token from this kvbm.yaml")
    st.add_argument("--token", help="auth token (default: $KVBM_DAEMON__TOKEN)")
    st.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the daemon")
    st.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    st.set_defaults(func=cmd_stats)

    from .loadgen.command import add_parser as add_replay_parser  # kvbm replay: its own module

    add_replay_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .registry import UnknownName
    from .sim.traces import TraceError

    args = build_parser().parse_args(argv)
    try:
        try:
            return args.func(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        return _pipe_closed()
    except (UsageError, ConfigError, TraceError, UnknownName, FileNotFoundError) as exc:
        return error(str(exc))
    except OSError as exc:  # a path the command was given: name it and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        return error(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return error("interrupted", 130)


def error(message: str, status: int = 2) -> int:
    """The one line every failure ends in."""
    try:
        print(f"kvbm: error: {message}", file=sys.stderr)
    except BrokenPipeError:
        pass
    return status


def _pipe_closed() -> int:
    """The reader went away (`kvbm ... | head -1`): stop quietly. stdout is pointed at
    /dev/null so that the interpreter's own flush at exit does not complain again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE: what a shell reports for a command killed by a closed pipe


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
