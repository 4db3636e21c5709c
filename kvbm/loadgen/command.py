"""`kvbm replay TRACE --url http://HOST:PORT`: a trace's requests against a running server.

    kvbm replay mooncake --url http://127.0.0.1:8000 --limit 200 --speed 2 --json
    kvbm replay trace.jsonl --url http://127.0.0.1:8000 --max-input 4000 --plot cdf.png

TRACE is a trace file `kvbm simulate` reads (Mooncake or Bailian JSONL, Parquet) or
"mooncake" for the bundled one. Requests go out at the trace's arrival times divided by
--speed (inf: all at once), as streaming /v1/completions with token-id prompts that keep the
trace's prefix sharing (kvbm.loadgen.prompts). The report: TTFT, inter-token and end-to-end
latency percentiles, throughput, and the server's prefix-cache counters (from its /metrics,
the difference over the run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


class _BadInput(Exception):
    """One line for the user: what was wrong and what to do (exit code 2)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    r = sub.add_parser("replay", help="replay a trace against an OpenAI-compatible server: TTFT, ITL, "
                                      "end-to-end latency, throughput, its cache counters")
    r.add_argument("trace", help="trace file (Mooncake/Bailian JSONL, Parquet) or 'mooncake' (bundled)")
    r.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    r.add_argument("--model", help="model name to request (default: the server's first in /v1/models)")
    r.add_argument("--limit", type=int, help="send only the first N requests")
    r.add_argument("--speed", type=float, default=1.0,
                   help="divide the trace's arrival times by this (default 1; inf: all at once)")
    r.add_argument("--max-input", type=int, help="cut prompts to N tokens (a small model's context)")
    r.add_argument("--max-output", type=int, help="cap each request's output tokens at N")
    r.add_argument("--vocab", type=int, default=1000, help="token ids are drawn below this (default 1000)")
    r.add_argument("--block-size", type=int, help="tokens per trace hash id (default: the format's)")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--plot", metavar="FILE", help="draw TTFT and end-to-end latency CDFs (needs matplotlib)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_replay)
    return r


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        return _replay(args)
    except _BadInput as exc:
        print(f"kvbm replay: error: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> None:
    if not args.url.startswith(("http://", "https://")):
        raise _BadInput(f"--url must be http://HOST:PORT or https://..., got {args.url!r}")
    if not (args.speed > 0):
        raise _BadInput(f"--speed must be > 0 (inf: all at once), got {args.speed}")
    for name in ("limit", "max_input", "max_output", "block_size"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "limit" else 1):
            raise _BadInput(f"--{name.replace('_', '-')} must be >= {0 if name == 'limit' else 1}, got {v}")
    if args.vocab <= 11:
        raise _BadInput(f"--vocab must be > 11, got {args.vocab}")
    if args.timeout <= 0:
        raise _BadInput(f"--timeout must be > 0 seconds, got {args.timeout}")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise _BadInput("kvbm replay needs httpx: pip install 'kvbm-tiered[replay]'") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _BadInput("--plot needs matplotlib: pip install 'kvbm-tiered[plot]'") from None


def _load(args: argparse.Namespace):
    from ..sim.traces import TraceError, load_trace

    path = args.trace
    if path == "mooncake":
        from pathlib import Path

        path = Path(__file__).parent.parent / "sim" / "data" / "mooncake_conversation.jsonl"
    try:
        return load_trace(path, limit=args.limit, block_size=args.block_size)
    except (TraceError, FileNotFoundError, ValueError) as exc:
        raise _BadInput(f"{exc}") from None


def _server_model(url: str, timeout: float) -> str:
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", timeout=min(timeout, 30.0))
        r.raise_for_status()
        models = r.json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise _BadInput(f"cannot list the models of {url} ({type(exc).__name__}: {exc}); "
                        f"is the server up? pass --model to skip this") from None
    if not models:
        raise _BadInput(f"{url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def _replay(args: argparse.Namespace) -> int:
    _check(args)
    trace = _load(args)
    if not trace.requests:
        raise _BadInput(f"{args.trace}: no requests to send")
    from .prompts import trace_jobs
    from .report import format_text, plot_cdf, scrape, summarize
    from .sender import send_all

    model = args.model or _server_model(args.url, args.timeout)
    jobs = trace_jobs(trace, args.speed, args.vocab, args.max_input, args.max_output)
    before = scrape(args.url)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="replay", unit="req", file=sys.stderr, dynamic_ncols=True)

    def done(res: Any) -> None:
        if bar is not None:
            bar.update(1)
            if res.error:
                bar.set_postfix_str("failed: " + res.error[:40])

    t0 = time.perf_counter()
    try:
        results = send_all(args.url, model, jobs, done, timeout=args.timeout)
    finally:
        if bar is not None:
            bar.close()
    duration = time.perf_counter() - t0
    report = summarize(results, duration, before, scrape(args.url) if before is not None else None)
    report["model"] = model
    report["url"] = args.url
    report["arrivals_s"] = [round(r.sent, 6) for r in results]
    if args.plot:
        plot_cdf(results, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_text(report))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
