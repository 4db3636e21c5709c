"""The benchmark report: run every benchmark this machine can run, write bench/RESULTS.md and plots.

    python bench/report.py            # the full suite: 14 min at load average 13, 32 min at 12-19 (2 cores)
    python bench/report.py --quick    # smaller runs, no disk or object benches (about 1.5 minutes)
    python bench/report.py --out /tmp/R.md --plots /tmp/plots   # elsewhere (default: beside this file)
    python bench/report.py --hog --only ops,disk,object,daemon --out /tmp/R.md
                                      # the data paths beside a one-core busy loop (issue 17)

Each benchmark runs as the command a reader would type (printed above its table), in a
subprocess, one after another so they do not share cores:

    replay       bench/bench_replay.py --json       BlockManager vs a plain OrderedDict LRU loop
    sweep        kvbm simulate mooncake --sweep     prefix hit ratio, every policy and Belady
    ops          bench/bench_ops.py --json          batched gather and CRC-32C vs one thread's sequential copy
    policy cost  bench/bench_policy_cost.py         ns per policy operation, hitdensity vs LRU
    demo         kvbm demo --json                   real bytes over G2/G3/G4, GB/s per path
    disk         bench/bench_disk.py --json         G2 <-> G3 vs dd, fio and NIXL POSIX (not --quick)
    object       bench/bench_object.py --json       G2 <-> G4 vs raw s3fs on moto and file:// (not --quick)
    daemon       bench/bench_daemon.py nixl         daemon peer pull vs bare NIXL READs (not --quick)

Issue 17's ratios (each data path over the limit measured in the same run) are kept in
bench/report_last.json, per condition (quiet, or `--hog`: beside a one-core busy loop); a ratio
more than 20 % below the last run of the same condition is flagged in RESULTS.md and on stderr.

RESULTS.md gets the machine (CPU model, cores, memory, OS, Python, GPU), then per benchmark the
command, the figures, the limit or peer each is compared to, and a PNG in --plots. Figures
that need tools CI lacks (a GPU, fio and NIXL installed by hand, a real bucket) or that were
measured by hand are kept in a *recorded* section: the text between the `recorded` markers of
the RESULTS.md being replaced is carried over verbatim (on the first run, which finds no
markers, the whole hand-written file becomes that section). A benchmark that fails is
reported with its exit status and the tail of its output; the others still run.

Needs kvbm installed with matplotlib (`pip install -e '.[dev]'`); fio and nixl are used by
the disk bench when present.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from common import cpu_model  # bench/common.py
from report_history import CAUSES, History, issue17_section, ratios  # bench/report_history.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- recorded:start -->", "<!-- recorded:end -->"
BENCHES = ("replay", "sweep", "ops", "cost", "demo", "disk", "object", "daemon")
POLICY_CAPS = [1000, 10_000, 30_000, 50_000, 100_000]
# The reference LRU column of kvbm/sim/data/README.md (Mooncake, prefix hit ratio).
LRU_REFERENCE = {1000: 0.0445, 10_000: 0.2112, 30_000: 0.3257, 50_000: 0.3546, 100_000: 0.3637}


# ---------------------------------------------------------------- running


class Run:
    """One benchmark command, its output and how long it took."""

    def __init__(self, argv: list[str], timeout: float = 900):
        self.argv = argv
        shown = " ".join(["python" if a == sys.executable else a for a in argv])
        self.shown = shown.replace("python -m kvbm.cli", "kvbm")  # the console script, same code
        print(f"$ {self.shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            self.rc, self.out, self.err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            self.rc, self.out, self.err = 124, e.stdout or "", f"timed out after {timeout:.0f} s"
        self.seconds = time.perf_counter() - t0
        print(f"  rc={self.rc} in {self.seconds:.1f} s", file=sys.stderr, flush=True)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def json(self):
        return json.loads(self.out)

    def failure(self) -> str:
        tail = (self.out + self.err).strip().splitlines()[-15:]
        return f"**failed** (exit status {self.rc}):\n\n```\n" + "\n".join(tail) + "\n```\n"


def py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(Path("bench") / script), *args]


def kvbm_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvbm.cli", *args]


# ---------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    cpu = cpu_model()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f"{mem:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    gpu = "none found"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        gpu = q.stdout.strip().replace("\n", "; ") or gpu
    disk = Path(os.environ.get("TMPDIR", "/tmp"))
    fs = "unknown"
    if shutil.which("df"):
        q = subprocess.run(["df", "-T", str(disk)], capture_output=True, text=True)
        parts = q.stdout.splitlines()[-1].split() if q.returncode == 0 else []
        fs = f"{parts[1]} on {parts[0]}" if len(parts) > 1 else fs
    tools = ", ".join(f"{t} {'yes' if shutil.which(t) else 'no'}" for t in ("dd", "fio"))
    try:
        import nixl  # noqa: F401

        tools += ", nixl yes"
    except ImportError:
        tools += ", nixl no"
    from kvbm import ops

    return {
        "CPU": f"{cpu}, {cores} cores usable",
        "memory": memory,
        "OS": platform.platform(),
        "Python": f"{platform.python_version()} ({platform.python_implementation()})",
        "GPU": gpu,
        f"temp dir ({disk})": fs,
        "kvbm": f"native={ops.HAVE_NATIVE}, crc32c={ops.CRC32C_IMPL}, cuda_built={ops.CUDA_BUILT}",
        "tools": tools,
    }


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


def _table(head: list[str], rows: list[list]) -> str:
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
    s += _table(["replay", "accesses/s"], [
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
    s += _table(["policy"] + [f"{c:,}" for c in caps], table)
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
    s += _table(["operation", "GB/s best", "GB/s median", "minor faults", "÷ limit"],
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
    s += _table(["path", "blocks", "GB", "GB/s", "limit GB/s"], rows)
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
    s += _table(["block", "write GB/s", "÷ dd", "÷ fio", "÷ NIXL", "read GB/s", "÷ dd", "÷ fio", "÷ NIXL"], table)
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
    s = (f"### G2 <-> G4 (objects)\n\n`{run.shown}` — ObjectStorage (header, CRC-32C, HMAC, copy into G2) vs "
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
    s += _table(["case", "way", "GiB/s (median)", "client CPU s/GiB", "ratio (raw time / kvbm time)"], rows)
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
        s += _table(["what", "GB/s (median)", "pull ÷ this"], rows)
        s += f"\nWrong blocks: {n.get('wrong_blocks')}.\n"
    return s, r


# ---------------------------------------------------------------- the file


# Each benchmark's section title in RESULTS.md: a bench that `--only` leaves out keeps its last section.
TITLES = {"replay": "### Replay", "sweep": "### Eviction quality", "ops": "### G2 -> G2 batched gather",
          "cost": "### Policy cost", "demo": "### `kvbm demo`", "disk": "### G2 <-> G3", "object": "### G2 <-> G4",
          "daemon": "### Daemon peer pull"}
KEPT = "_Not re-run by this report (`--only` or `--quick`): carried over from the previous RESULTS.md._"


def kept_sections(previous: Path) -> dict[str, str]:
    """The measured sections of the RESULTS.md being replaced, by benchmark, each marked as carried over."""
    text = previous.read_text() if previous.exists() else ""
    measured = text.split("## Measured by this report", 1)[-1].split("\n## Recorded", 1)[0] if text else ""
    out = {}
    for part in re.split(r"^(?=### )", measured, flags=re.M):
        bench = next((b for b, t in TITLES.items() if part.startswith(t)), None)
        if bench is not None:
            head, _, body = part.partition("\n")
            out[bench] = f"{head}\n\n{KEPT}\n\n{body.strip().removeprefix(KEPT).strip()}\n"
    return out


def recorded(previous: Path) -> str:
    """The hand-recorded text to carry over from the RESULTS.md being replaced."""
    if not previous.exists():
        return "_No recorded figures: there was no RESULTS.md to carry over._\n"
    text = previous.read_text()
    if START in text and END in text:
        inside = text.split(START, 1)[1].split(END, 1)[0].strip("\n")
        after = text.split(END, 1)[1].strip("\n")  # a section someone appended after the marker: kept
        return inside + ("\n\n" + after if after else "") + "\n"
    body = text.split("\n", 1)[1] if text.startswith("# ") else text  # the first run: all of it
    body = re.sub(r"^(#{2,5}) ", r"#\1 ", body, flags=re.M)  # one level down, under "Recorded"
    return body.strip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs; skip the disk and object benches")
    ap.add_argument("--hog", action="store_true",
                    help="run everything beside a one-core busy loop (issue 17's 'beside another job')")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--plots", default=str(HERE / "plots"))
    ap.add_argument("--history", default=str(HERE / "report_last.json"), help="issue 17's ratios, kept per condition")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(BENCHES):
        print(f"report.py: --only takes {','.join(BENCHES)}; got {','.join(sorted(only - set(BENCHES)))}",
              file=sys.stderr)
        return 2
    if args.quick:
        only -= {"disk", "object", "daemon"}
    out, plots = Path(args.out).resolve(), Path(args.plots).resolve()
    plots.mkdir(parents=True, exist_ok=True)
    carried = recorded(out if out.exists() else HERE / "RESULTS.md")
    kept = kept_sections(out if out.exists() else HERE / "RESULTS.md")
    t0 = time.perf_counter()
    mach = machine()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
    try:
        runs = _run_benches(only, args.quick)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    replay, sweep, ops, cost, demo, disk, obj, daemon = (runs.get(b) for b in BENCHES)

    not_run = "Not run (`--quick` or `--only`); see the recorded figures below.\n"
    ops_text, numpy_gbs, ops_json = section_ops(ops, plots, out) if ops else (
        kept.get("ops", "### G2 -> G2 batched gather and checksums\n\n" + not_run), None, None)
    disk_text, disk_limits = section_disk(disk, plots, out) if disk else (
        kept.get("disk", "### G2 <-> G3 (O_DIRECT slot file)\n\n" + not_run), None)
    obj_text, obj_json = section_object(obj, plots, out) if obj else (
        kept.get("object", "### G2 <-> G4 (objects)\n\n" + not_run), None)
    daemon_text, daemon_json = section_daemon(daemon) if daemon else (kept.get("daemon", ""), None)
    disk_json = disk.json() if disk and disk.ok else None
    load = os.getloadavg()[0]
    history = History(Path(args.history))
    flags = history.record("hog" if args.hog else "quiet", ratios(ops_json, disk_json, obj_json, daemon_json), load)
    for f in flags:
        print(f"report.py: REGRESSION {f}", file=sys.stderr)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    shown = " ".join(a for a in ("--quick" if args.quick else "", "--hog" if args.hog else "",
                                 f"--only {args.only}" if only != set(BENCHES) else "") if a)

    def section(name: str, fn, *a) -> str:
        return fn(runs[name], *a) if name in runs else kept.get(name, "")

    parts = [
        "# Benchmark results\n",
        f"Written by `python bench/report.py{' ' + shown if shown else ''}` on {when} in "
        f"{time.perf_counter() - t0:.0f} s (load average at the end {load:.1f}"
        f"{'; beside a one-core busy loop' if args.hog else ''}); rerun it to refresh everything above "
        f"*Recorded*. Plots are in `{os.path.relpath(plots, out.parent)}/`. Benchmarks run one at a time; on a "
        f"shared or small machine expect ±20–30 % between runs (every ratio is taken inside one run). "
        f"No figure here is asserted by a test.\n",
        "## Machine\n",
        _table(["machine", "this run"], [[k, v] for k, v in mach.items()]),
        "## Measured by this report\n",
        issue17_section(history, CAUSES),
        section("replay", section_replay, plots, out),
        section("sweep", section_sweep, plots, out),
        ops_text,
        section("cost", section_policy_cost),
        section("demo", section_demo, plots, out, numpy_gbs, disk_limits),
        disk_text,
        obj_text,
        daemon_text,
        "### G1 <-> G2 (GPU)\n\n`bash bench/gpu_check.sh` needs a CUDA device and is not part of this "
        "report; its figures, when measured, are in the recorded section.\n",
        "## Recorded\n",
        "Figures measured by hand or with tools this report does not install (fio and NIXL by hand, a "
        "GPU, a real bucket), carried over verbatim from the previous RESULTS.md. Each names its own "
        "command, machine and date; edit between the markers to update them.\n",
        START,
        carried,
        END,
    ]
    out.write_text("\n".join(p.rstrip("\n") + "\n" for p in parts if p))
    print(f"wrote {out} and {len(list(plots.glob('*.png')))} plots in {plots}", file=sys.stderr)
    return 0 if all(r.ok for r in runs.values()) else 1


def _run_benches(only: set[str], quick: bool) -> dict[str, Run]:
    """Each selected benchmark as its own command, one after another."""
    runs: dict[str, Run] = {}
    if "replay" in only:
        runs["replay"] = Run(py("bench_replay.py", "--json", "--repeat", "3" if quick else "5"))
    if "sweep" in only:
        from kvbm.registry import EVICTION  # every registered policy, as `kvbm policies` lists them

        runs["sweep"] = Run(kvbm_cli("simulate", "mooncake", "--quiet", "--json", "--sweep",
                                     ",".join(map(str, POLICY_CAPS)), "--policy", ",".join(EVICTION.names())))
    if "ops" in only:
        runs["ops"] = Run(py("bench_ops.py", "--json", *(["--blocks", "1024"] if quick else [])))
    if "cost" in only:
        # 15 minutes were not enough at load average 15 on 2 cores (2026-12-04); it is pure CPU
        runs["cost"] = Run(py("bench_policy_cost.py", "--repeat", "1" if quick else "3"), timeout=2400)
    if "disk" in only:
        runs["disk"] = Run(py("bench_disk.py", "--json", "--gib", "1"))
    if "object" in only:
        runs["object"] = Run(py("bench_object.py", "--json", "--blocks", "16"))
    if "daemon" in only:
        runs["daemon"] = Run(py("bench_daemon.py", "nixl", "--rounds", "3"), timeout=600)
    if "demo" in only:
        runs["demo"] = Run(kvbm_cli("demo", "--json", "--quiet"))
    return runs


if __name__ == "__main__":
    sys.exit(main())
