"""RESULTS.md's measured sections: each benchmark's JSON as a table, its peer or limit, and a PNG.

    section_replay / section_sweep / section_ops / section_policy_cost / section_demo /
    section_disk / section_object / section_daemon (run, ...) -> markdown (and the figures
                                                                  later sections or the history need)
    md_table(head, rows)                                          a markdown table

`run` is report.py's Run: the command as shown, its exit status and output. A benchmark that
failed gets its exit status and the tail of its output instead of a table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from report import Run

# The reference LRU column of kvbm/sim/data/README.md (Mooncake, prefix hit ratio).
LRU_REFERENCE = {1000: 0.0445, 10_000: 0.2112, 30_000: 0.3257, 50_000: 0.3546, 100_000: 0.3637}


# ---------------------------------------------------------------- plots


def _figure(w=7.0, h=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _barh(path: Path, labels, values, xlabel, title, limit=None, limit_label=None, note=None):
    fig = _figure(7.5, 0.42 * len(labels) + 1.6)
    ax = fig.subplots()
    y = range(len(labels))
    ax.barh(list(y), values, color="tab:blue")
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
    if limit:
        ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1.2, label=limit_label)
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max([*values, limit or 0]) * 1.18)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.35")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _grouped(path: Path, groups, series: dict[str, list[float]], ylabel, title):
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in vals], width, label=name)
        for b, v in zip(bars, vals):
            if v:
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(v or 0 for vals in series.values() for v in vals) * 1.3)  # room for the legend
    ax.legend(frameon=False, fontsize=8, ncol=3, loc="upper center")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- sections


def md_table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _img(plots: Path, out: Path, name: str, alt: str) -> str:
    return f"\n![{alt}]({os.path.relpath(plots / name, out.parent)})\n"


def section_replay(run: Run, plots: Path, out: Path) -> str:
    s = f"### Replay: BlockManager vs a plain loop\n\n`{run.shown}` — bundled Mooncake trace, one LRU tier, metadata only.\n\n"
    if not run.ok:
        return s + run.failure()
    r = run.json()
    ratio = r["manager_over_plain_time"]
    s += (f"{r['block_accesses']:,} block accesses at capacity {r['capacity']:,}; both give prefix hit "
          f"ratio {r['prefix_hit_ratio']:.4f} (checked by the bench).\n\n")
    s += md_table(["replay", "accesses/s"], [
        ["plain OrderedDict LRU loop (peer)", f"{r['plain_lru_accesses_per_s'] / 1e6:.2f} M"],
        ["BlockManager.serve per request (locate, load, store; pins, stats)", f"{r['manager_accesses_per_s'] / 1e6:.2f} M"],
        ["**manager / plain time**", f"**{ratio:.2f}×** (target ≤ 2×: {'met' if ratio <= 2 else '**not met**'})"],
    ])
    _barh(plots / "replay.png", ["plain OrderedDict LRU loop", "BlockManager"],
          [r["plain_lru_accesses_per_s"] / 1e6, r["manager_accesses_per_s"] / 1e6],
          "million block accesses per second (higher is better)",
          f"replay speed, Mooncake at {r['capacity']:,} blocks: manager takes {ratio:.2f}× the time")
    return s + _img(plots, out, "replay.png", "replay speed")


def section_sweep(run: Run, plots: Path, out: Path) -> str:
    s = (f"### Eviction quality: prefix hit ratio vs capacity\n\n`{run.shown}` — every registered "
         f"policy on the whole bundled Mooncake trace, capacity in 512-token blocks. Peers: Belady "
         f"(offline optimum, the ceiling) and the reference LRU column of `kvbm/sim/data/README.md`.\n\n")
    if not run.ok:
        return s + run.failure()
    rows = run.json()["sweep"]
    caps = sorted({r["capacity"] for r in rows})
    ratio = {(r["policy"], r["capacity"]): r["prefix_hit_ratio"] for r in rows}
    policies = sorted({r["policy"] for r in rows}, key=lambda p: (p == "belady", -ratio.get((p, 10_000), 0)))
    table = [[f"**{p}**" if p == "belady" else p] + [f"{ratio[p, c]:.4f}" for c in caps] for p in policies]
    table.append(["LRU reference"] + [f"{LRU_REFERENCE[c]:.4f}" if c in LRU_REFERENCE else "-" for c in caps])
    s += md_table(["policy"] + [f"{c:,}" for c in caps], table)
    if all(("lru", c) in ratio for c in LRU_REFERENCE):
        worst = max(abs(ratio["lru", c] - v) for c, v in LRU_REFERENCE.items())
        s += f"\nLRU vs the reference: largest difference {worst:.4f} ({'matches to 4 decimals' if worst < 5e-5 else 'check'}).\n"
    from kvbm.sim.plot import plot_sweep

    plot_sweep(rows, plots / "policy_sweep.png", title="Mooncake: prefix hit ratio vs capacity")
    return s + _img(plots, out, "policy_sweep.png", "policy sweep")


def section_ops(run: Run, plots: Path, out: Path) -> tuple[str, float | None, dict | None]:
    s = (f"### G2 -> G2 batched gather and checksums\n\n`{run.shown}` — limit: one thread's sequential copy "
         f"of the same bytes in the same run, the fastest (by median) of numpy's copyto, libc memcpy and kvbm's streaming "
         f"copy (targets: one thread ≥ 0.9×, threads=auto ≥ 1.0×).\n\n")
    if not run.ok:
        return s + run.failure(), None, None
    r = run.json()
    s += f"`{r['head']}`; limit: {r['limit']}, {r['limit_gbs']:.2f} GB/s; G2 pool huge pages: " \
         f"{r['host_pool_hugepages_kib']} KiB.\n\n"
    s += md_table(["operation", "GB/s best", "GB/s median", "minor faults", "÷ limit"],
                [[x["label"], f"{x['gbs']:.2f}", f"{x['gbs_median']:.2f}", x["faults"],
                  f"{x['ratio']:.2f}×" if x["ratio"] else "-"] for x in r["rows"]])
    shown = [x for x in r["rows"] if "pure Python" not in x["label"]]
    _barh(plots / "ops.png", [x["label"] for x in shown], [x["gbs"] for x in shown], "GB/s (best of runs)",
          "kvbm.ops: batched gather and CRC-32C", limit=r["limit_gbs"], limit_label=f"limit ({r['limit']})")
    return s + _img(plots, out, "ops.png", "ops bandwidth"), r["limit_gbs"], r


def section_policy_cost(run: Run) -> str:
    s = f"### Policy cost per operation\n\n`{run.shown}` — ns per key; peer: LRU on the same streams.\n\n"
    if not run.ok:
        return s + run.failure()
    return s + "```\n" + run.out.strip() + "\n```\n"


def section_demo(run: Run, plots: Path, out: Path, numpy_gbs, disk_limits) -> str:
    s = (f"### `kvbm demo`: real bytes over G2 / G3 / G4\n\n`{run.shown}` — the README's main job: "
         f"Llama-3.1-8B layout (TP rank 0/8, 16-token blocks, 256 KiB), G2 host, G3 O_DIRECT slot file, "
         f"G4 `file://` objects, every onboarded block verified. Limits: memory paths against the numpy "
         f"copy of the ops bench above; disk paths against `dd` O_DIRECT of the disk bench below "
         f"(when it ran).\n\n")
    if not run.ok:
        return s + run.failure()
    r = run.json()
    s += (f"{r['requests']:,} requests, {r['block_accesses']:,} block accesses; prefix hit ratio "
          f"{r['prefix_hit_ratio']:.4f}; {r['bytes_moved'] / 1e9:.1f} GB moved in {r['seconds']:.1f} s; "
          f"{r['verified_blocks']:,} onboarded blocks verified, {r['mismatched_blocks']} mismatched.\n\n")
    order = ["buffer->host", "host->disk", "disk->object", "host->buffer", "disk->buffer", "object->buffer"]
    paths = [p for p in order if p in r["transfers"]] + [p for p in r["transfers"] if p not in order]

    def limit(path):
        if "disk" in path and disk_limits:
            key = "dd_write_s" if path.endswith("disk") else "dd_read_s"
            if key in disk_limits:
                return f"dd {disk_limits['_bytes'] / disk_limits[key] / 1e9:.2f}"
        if path in ("buffer->host", "host->buffer") and numpy_gbs:
            return f"numpy copy {numpy_gbs:.2f}"
        return "-"

    rows = [[p, f"{t['blocks']:,}", f"{t['bytes'] / 1e9:.2f}", f"{t['gb_per_s']:.2f}", limit(p)]
            for p, t in ((p, r["transfers"][p]) for p in paths)]
    s += md_table(["path", "blocks", "GB", "GB/s", "limit GB/s"], rows)
    _barh(plots / "demo_paths.png", paths, [r["transfers"][p]["gb_per_s"] for p in paths], "GB/s",
          "kvbm demo: bandwidth per transfer path", limit=numpy_gbs,
          limit_label="numpy copy, same machine (memory limit)" if numpy_gbs else None)
    return s + _img(plots, out, "demo_paths.png", "demo per-path bandwidth")


def section_disk(run: Run, plots: Path, out: Path) -> tuple[str, dict | None]:
    s = (f"### G2 <-> G3 (O_DIRECT slot file)\n\n`{run.shown}` — HostStorage <-> DiskStorage, best of "
         f"runs, beside `dd` (O_DIRECT, bs=2M; target ≥ 0.85×), fio psync and NIXL's POSIX backend "
         f"(target ≥ 1.0×; the paired median over rounds, see bench_disk.py) on the same file system in the "
         f"same run, where installed.\n\n")
    if not run.ok:
        return s + run.failure(), None
    r = run.json()
    lim, total = r["limits"], r["rows"][0]["bytes"]
    lim["_bytes"] = total

    def ratio(ours_s, ref_s):
        return f"{ref_s / ours_s:.2f}" if ref_s else "-"

    table, series = [], {"kvbm write": [], "kvbm read": [], "dd write": [], "dd read": [],
                         "NIXL write": [], "NIXL read": []}
    for row in r["rows"]:
        cells = [f"{row['block'] >> 10} KiB"]
        for d in ("write", "read"):
            ours = row[f"kvbm_{d}_s"]
            paired = row.get(f"ratio_nixl_{d}")
            cells += [f"{row['bytes'] / ours / 1e9:.2f}", ratio(ours, lim.get(f"dd_{d}_s")),
                      ratio(ours, lim.get(f"fio_{d}_s")),
                      f"{paired:.2f}" if paired else ratio(ours, row.get(f"nixl_{d}_s"))]
            series[f"kvbm {d}"].append(row["bytes"] / ours / 1e9)
            series[f"dd {d}"].append(total / lim[f"dd_{d}_s"] / 1e9 if f"dd_{d}_s" in lim else None)
            nx = row.get(f"nixl_{d}_s")
            series[f"NIXL {d}"].append(row["bytes"] / nx / 1e9 if nx else None)
        table.append(cells)
    s += f"NIXL: {r['nixl']}; fio: {'yes' if 'fio_write_s' in lim else 'not installed'}; {total / 2**30:.1f} GiB per run.\n\n"
    io_only = [f"{row['block'] >> 10} KiB: write {row['ratio_nixl_io_only_write']:.2f}×, read "
               f"{row['ratio_nixl_io_only_read']:.2f}×" for row in r["rows"] if "ratio_nixl_io_only_write" in row]
    if io_only:
        s += ("kvbm's native I/O alone (the same batches through `ops.pwrite_blocks`/`pread_blocks`, no CRC-32C, "
              "no index), ÷ NIXL POSIX: " + "; ".join(io_only) + ".\n\n")
    beside = [f"{row['block'] >> 10} KiB: write {row['ratio_nixl_io_other_crc_write']:.2f}×, read "
              f"{row['ratio_nixl_io_other_crc_read']:.2f}×" for row in r["rows"] if "ratio_nixl_io_other_crc_write" in row]
    if beside:
        s += ("The same native I/O while another thread checksums as many bytes of other memory (the CRC's CPU, "
              "off the data path), ÷ NIXL POSIX: " + "; ".join(beside) + ".\n\n")
    s += md_table(["block", "write GB/s", "÷ dd", "÷ fio", "÷ NIXL", "read GB/s", "÷ dd", "÷ fio", "÷ NIXL"], table)
    costs = [f"{row['block'] >> 10} KiB: " + ", ".join(f"{k} {v:.2f} s ({row['steal'][k]:.0%})"
                                                       for k, v in row["cpu_s_per_gib"].items())
             for row in r["rows"] if "cpu_s_per_gib" in row]
    if costs:
        s += ("\nWhere the time goes (medians): the bench process's CPU seconds per GiB moved, and in brackets "
              "steal, the share of all CPU ticks the host took while each ran (in a VM the disk may be emulated "
              "on the CPUs behind ours). " + "; ".join(costs) + ".\n")
    series = {k: v for k, v in series.items() if any(v)}
    _grouped(plots / "disk.png", [f"{row['block'] >> 10} KiB blocks" for row in r["rows"]], series,
             "GB/s", "G2 <-> G3: kvbm DiskStorage beside dd and NIXL POSIX")
    return s + _img(plots, out, "disk.png", "disk bandwidth"), lim


def section_object(run: Run, plots: Path, out: Path) -> tuple[str, dict | None]:
    s = (f"### G2 <-> G4 (objects)\n\n`{run.shown}` — ObjectStorage (header, CRC-32C, MAC: v3 Poly1305, the payload into G2) vs "
         f"raw s3fs `pipe`/`cat` of the bare payloads: the peer is a stock s3fs client, the strict limit the "
         f"client ObjectStorage itself uses (botocore's own CRC32 off); moto's S3 server on loopback, and "
         f"`file://` (target ≥ 0.9× for S3).\n\n")
    if not run.ok:
        return s + run.failure(), None
    r = run.json()
    s += "```\n" + r["machine"] + "\n" + r["head"] + "\n```\n\n"
    if "cpu_s_per_gib" in r:
        s += ("CPU per GiB on this machine in this run (one thread; what kvbm adds per object, and what a stock "
              "botocore adds per PUT): " + ", ".join(f"{k} {v:.2f} s" for k, v in r["cpu_s_per_gib"].items()) + ".\n\n")
    rows, groups, ours, raw = [], [], [], []
    for case in r["cases"]:
        for d in ("write", "read"):
            figs = {x["label"]: x for x in case["rows"]}
            peer, strict = case["ratios"][f"{d} peer"], case["ratios"][f"{d} strict"]
            for label, x in figs.items():
                if not label.endswith(d) and f" {d}," not in label and not label.startswith(f"raw {d}"):
                    continue
                ratio = "-"
                if label == f"kvbm {d}":
                    ratio = f"**{peer['ratio']:.2f}×** ÷ {peer['limit']}"
                    if strict["limit"] != peer["limit"]:
                        ratio += f"; {strict['ratio']:.2f}× ÷ {strict['limit']}"
                rows.append([case["case"], label, f"{x['gibs']:.3f}", f"{x['cpu_s_per_gib']:.2f}", ratio])
            groups.append(f"{case['case']}\n{d}")
            ours.append(figs[f"kvbm {d}"]["gibs"])
            raw.append(figs[peer["limit"]]["gibs"])
    s += md_table(["case", "way", "GiB/s (median)", "client CPU s/GiB", "ratio (raw time / kvbm time)"], rows)
    if groups:
        _grouped(plots / "object.png", groups, {"kvbm ObjectStorage": ours, "raw s3fs (peer)": raw},
                 "GiB/s", "G2 <-> G4: kvbm beside raw s3fs")
        s += _img(plots, out, "object.png", "object store bandwidth")
    return s, r


def section_daemon(run: Run) -> tuple[str, dict | None]:
    s = (f"### Daemon peer pull (H12a's bench)\n\n`{run.shown}` — a pull between two daemons over NIXL, "
         f"end to end, vs bare two-agent NIXL READs of the same bytes in the same run.\n\n")
    if not run.ok:
        return s + run.failure(), None
    try:
        r = json.loads(run.out[run.out.index("{"):])
    except ValueError:
        return s + "**unreadable output**\n", None
    n = r.get("nixl", {})
    if n:
        rows = [["daemon pull, end to end", n["daemon_pull_end_to_end"]["median_gbps"], "-"]]
        for kind in ("shm", "anon", "stock"):
            if f"bare_read_{kind}" in n:
                rows.append([f"bare READ, {kind}", n[f"bare_read_{kind}"]["median_gbps"],
                             f"{n[f'ratio_vs_bare_{kind}']['median']:.2f}×"])
        s += md_table(["what", "GB/s (median)", "pull ÷ this"], rows)
        s += f"\nWrong blocks: {n.get('wrong_blocks')}.\n"
    return s, r
