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
the disk bench when present. This file runs the benches and writes the file; each bench's
section (table, plot) is rendered in report_sections.py, issue 17's ratios kept in report_history.py.
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
from report_sections import (section_daemon, section_demo, section_disk, section_object,  # bench/report_sections.py
                             section_ops, section_policy_cost, section_replay, section_sweep, md_table)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- recorded:start -->", "<!-- recorded:end -->"
BENCHES = ("replay", "sweep", "ops", "cost", "demo", "disk", "object", "daemon")
POLICY_CAPS = [1000, 10_000, 30_000, 50_000, 100_000]


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
    dload = runs.get("daemon_load")
    if dload is not None and dload.ok:  # one client's p50 beside the bare round trip's, in the daemon section
        daemon_json = dict(daemon_json or {}, load=dload.json()["load"])
        lj = daemon_json["load"]
        bare = min(lj["bare_roundtrip"]["before"]["p50_us"], lj["bare_roundtrip"]["after"]["p50_us"])
        daemon_text += (f"\n`{dload.shown}` — one client's small ops (lookup, store, load, pin, events) "
                        f"against a bare zmq DEALER/ROUTER + msgpack round trip over ipc in the same run: "
                        f"p50 **{lj['p50_us']} µs** vs bare {bare} µs = **{lj['p50_over_bare_p50']}×** "
                        f"(target ≤ 2×), p99 {lj['p99_us']} µs, {lj['ops_per_s']} ops/s, "
                        f"{lj['errors']} errors, {lj['wrong_bytes_blocks']} wrong-bytes blocks.\n")
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
        md_table(["machine", "this run"], [[k, v] for k, v in mach.items()]),
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
        # issue 17's small-op row: one client's round trips vs a bare zmq+msgpack round trip, same run
        runs["daemon_load"] = Run(py("bench_daemon.py", "load", "--clients", "1", "--ops", "3000"), timeout=600)
    if "demo" in only:
        runs["demo"] = Run(kvbm_cli("demo", "--json", "--quiet"))
    return runs


if __name__ == "__main__":
    sys.exit(main())
