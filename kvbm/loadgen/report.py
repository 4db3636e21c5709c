"""What a replay measured: latency percentiles, throughput, the server's cache counters.

    summarize(results, duration, before, after)   the report dict (`kvbm replay --json`)
    scrape(url)                                    the server's /metrics counters, {name: value}
    format_text(report)                            the human-readable report
    plot_cdf(results, path)                        TTFT and end-to-end latency CDFs (matplotlib)

Percentiles are nearest-rank on the sorted values (p99 of 10 values is the largest), so a
report over a few requests names values that were measured, not interpolated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .sender import Result

def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values, None when empty."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(s)))
    return s[min(rank, len(s)) - 1]


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "mean": (sum(values) / len(values)) if values else None}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {counter: value summed over its label sets} for every `*prefix_cache*`
    counter (vLLM: prefix_cache_{queries,hits}, external_prefix_cache_{queries,hits}, in tokens)
    and every `kvbm*` counter; the `_total` suffix is dropped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not name.endswith("_total") or "prefix_cache" not in name and not name.startswith("kvbm"):
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        key = name[:-len("_total")]
        out[key] = out.get(key, 0.0) + value
    return out


def scrape(url: str, timeout: float = 10.0) -> dict[str, float] | None:
    """The server's cache counters now, or None when it has no /metrics."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return parse_metrics(r.text)


def summarize(results: Sequence[Result], duration: float, before: dict | None = None,
              after: dict | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    report: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "input_tokens": sum(r.input_tokens for r in ok),
        "output_tokens": out_tokens,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
        "ttft_s": _dist([r.ttft for r in ok]),
        "itl_s": _dist([g for r in ok for g in r.gaps]),
        "e2e_s": _dist([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    if before is not None and after is not None:
        report["server_metrics"] = {k: after[k] - before.get(k, 0.0) for k in sorted(after)}
    else:
        report["server_metrics"] = None
    return report


def format_text(report: dict[str, Any]) -> str:
    def ms(d: dict, k: str) -> str:
        v = d.get(k)
        return "-" if v is None else f"{v * 1000:.1f}"

    lines = [f"requests {report['requests']}  completed {report['completed']}  failed {report['failed']}  "
             f"in {report['duration_s']:.1f} s",
             f"throughput: {report['requests_per_s'] or 0:.2f} req/s, {report['output_tokens_per_s'] or 0:.1f} "
             f"output tok/s ({report['input_tokens']} input, {report['output_tokens']} output tokens)",
             f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}"]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("end to end", "e2e_s")):
        d = report[key]
        lines.append(f"{name:<14}" + "".join(f"{ms(d, k):>10}" for k in ("p50", "p90", "p99", "mean")))
    metrics = report.get("server_metrics")
    if metrics:
        lines.append("server counters during the run:")
        lines += [f"  {k} {v:g}" for k, v in metrics.items()]
    elif metrics is None:
        lines.append("server counters: no /metrics")
    for e in report["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def plot_cdf(results: Sequence[Result], path: str) -> None:
    """TTFT and end-to-end latency CDFs of the completed requests, written to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in (("TTFT", [r.ttft for r in ok]), ("end to end", [r.e2e for r in ok])):
        s = sorted(values)
        ax.step(s, [(i + 1) / len(s) for i in range(len(s))], where="post", label=label)
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{len(ok)} requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
