"""Plots of simulator results.

plot_sweep    prefix hit ratio vs capacity, one line per policy, Belady as the ceiling

matplotlib is imported lazily and drawn on an Agg canvas without pyplot (no display, no
global backend switch): `pip install 'kvbm-tiered[plot]'`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["plot_sweep"]

_HINT = "plotting needs matplotlib: pip install 'kvbm-tiered[plot]'"
_CEILING = "belady"  # offline optimum: drawn dashed, as the bound no online policy passes


def _figure():
    """A Figure on an Agg canvas; no pyplot, so a caller's backend and state are untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:
        raise ImportError(_HINT) from e
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, FuncFormatter


def plot_sweep(results: Iterable[Mapping[str, Any]], path: str | Path,
               title: str | None = None, metric: str = "prefix_hit_ratio") -> Path:
    """Save a PNG of `metric` vs capacity (blocks, log scale), one line per policy.

    `results` holds dicts with at least "policy", "capacity" and `metric`; other keys are
    ignored. Returns the path written.
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, row in enumerate(results):
        try:
            series[str(row["policy"])].append((int(row["capacity"]), float(row[metric])))
        except KeyError as e:
            raise ValueError(f"result {i} has no {e.args[0]!r}: {dict(row)}") from None
    if not series:
        raise ValueError("plot_sweep needs at least one result")

    fig, FuncFormatter = _figure()
    ax = fig.subplots()
    online = sorted(p for p in series if p.lower() != _CEILING)
    for policy in online:
        xs, ys = zip(*sorted(series[policy]))
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.8, label=policy)
    for policy in (p for p in series if p.lower() == _CEILING):
        xs, ys = zip(*sorted(series[policy]))
        ax.plot(xs, ys, linestyle="--", color="0.25", linewidth=1.5,
                label=f"{policy} (ceiling)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("capacity (blocks)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, min(1.0, max(y for pts in series.values() for _, y in pts) * 1.1 + 0.02))
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(loc="lower right", frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
