"""bench/report_history.py: issue 17's ratios are read from the benches' JSON, kept per
condition, and a ratio that fell by more than 20 % since the last run is flagged."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from report_history import History, issue17_section, ratios  # noqa: E402

OPS = {"rows": [
    {"label": "numpy copyto (one thread, in order)", "ratio": None},
    {"label": "copy_blocks native, threads=1, random order", "ratio": 0.93},
    {"label": "copy_blocks native, threads=auto, random order", "ratio": 1.10},
    {"label": "copy_blocks_crc32c (fused), threads=1, random order", "ratio": 0.7},
]}
DISK = {"rows": [{"kvbm_write_s": 1.0, "nixl_write_s": 0.9, "kvbm_read_s": 1.0, "nixl_read_s": 1.2},
                 {"kvbm_write_s": 1.0, "nixl_write_s": 1.1, "kvbm_read_s": 1.0, "nixl_read_s": 1.0}]}
OBJ = {"cases": [{"case": "s3/moto", "ratios": {
    "write peer": {"ratio": 0.95, "limit": "raw write"}, "write strict": {"ratio": 0.8, "limit": "x"},
    "read peer": {"ratio": 0.91, "limit": "raw read, ranged"}, "read strict": {"ratio": 0.85, "limit": "y"}}}]}


def test_ratios_come_from_each_bench_and_the_worst_disk_size_counts():
    got = ratios(OPS, DISK, OBJ, None)
    assert got == {"g2_gather_1t": 0.93, "g2_gather_auto": 1.10, "g2_fused_crc": 0.7, "g4_write": 0.95,
                   "g4_write_strict": 0.8, "g4_read": 0.91, "g4_read_strict": 0.85,
                   "g3_write": pytest.approx(0.9), "g3_read": pytest.approx(1.0)}
    assert ratios(None, None, None, None) == {}


def test_a_drop_of_more_than_20_percent_is_flagged_per_condition(tmp_path):
    path = tmp_path / "last.json"
    # first run: nothing to compare with
    assert History(path).record("quiet", {"g4_write": 1.0, "g3_read": 1.0}, load=1.0) == []
    # a hog run is compared with hog runs only: 0.5 is no regression of the quiet 1.0
    assert History(path).record("hog", {"g4_write": 0.5}, load=3.0) == []
    # quiet again: -10 % passes, -25 % is flagged
    flags = History(path).record("quiet", {"g4_write": 0.9, "g3_read": 0.75}, load=1.0)
    assert len(flags) == 1 and flags[0].startswith("g3_read: 0.75 now, 1.00 in the last quiet run (-25%)")
    kept = json.loads(path.read_text())
    assert kept["quiet"]["ratios"] == {"g4_write": 0.9, "g3_read": 0.75}
    assert kept["quiet"]["previous"] == {"g4_write": 1.0, "g3_read": 1.0}
    assert kept["hog"]["ratios"] == {"g4_write": 0.5}


def test_the_section_shows_both_conditions_targets_and_flags(tmp_path):
    h = History(tmp_path / "last.json")
    h.record("quiet", {"g2_gather_1t": 1.0, "g4_write": 0.95}, load=1.0)
    h.record("quiet", {"g2_gather_1t": 0.7, "g4_write": 0.95}, load=1.0)
    h.record("hog", {"g2_gather_1t": 0.92, "g4_write": 0.85}, load=3.0)
    text = issue17_section(h, {"g4_write": "the MAC"})
    gather = next(line for line in text.splitlines() if line.startswith("| G2 batched gather, 4,096"))
    assert "**0.70×** ⚠ (last run 1.00×)" in gather and "**0.92×**" in gather and "≥ 0.9: **not met**" in gather
    g4 = next(line for line in text.splitlines() if line.startswith("| G2 → G4, moto S3 | ÷ raw s3fs (stock"))
    assert "≥ 0.9: **not met**" in g4 and g4.endswith("the MAC |")  # 0.85 beside the hog
    assert "g2_gather_1t: 0.70 now, 1.00 in the last quiet run" in text
    assert "| daemon peer pull" in text and "not run" in text


def test_a_row_not_measured_keeps_its_last_figure_with_its_time_and_load(tmp_path):
    path = tmp_path / "last.json"
    History(path).record("quiet", {"g4_write": 0.95, "daemon_nixl": 1.5}, load=2.0)
    # a `--only ops` run: the G4 and daemon rows are not measured, so they keep their figures
    assert History(path).record("quiet", {"g2_gather_1t": 1.0}, load=3.0) == []
    kept = json.loads(path.read_text())["quiet"]
    assert kept["ratios"] == {"g2_gather_1t": 1.0}
    assert {k: e["ratio"] for k, e in kept["earlier"].items()} == {"g4_write": 0.95, "daemon_nixl": 1.5}
    assert kept["earlier"]["g4_write"]["loadavg"] == 2.0
    # measured again: compared with the kept figure, and no longer "earlier"
    flags = History(path).record("quiet", {"g4_write": 0.7}, load=1.0)
    assert flags and flags[0].startswith("g4_write: 0.70 now, 0.95 in the last quiet run")
    kept = json.loads(path.read_text())["quiet"]
    assert set(kept["earlier"]) == {"g2_gather_1t", "daemon_nixl"}
    text = issue17_section(History(path), {})
    daemon = next(line for line in text.splitlines() if line.startswith("| daemon peer pull"))
    assert "1.50× (not re-run;" in daemon and "load 2.0)" in daemon and "≥ 0.9: met" in daemon


def test_a_quiet_run_under_load_says_a_quiet_run_is_pending(tmp_path):
    h = History(tmp_path / "last.json")
    h.record("quiet", {"g2_gather_1t": 1.0}, load=1.5)
    assert "pending" not in issue17_section(h, {})
    h.record("quiet", {"g2_gather_1t": 1.0}, load=17.2)
    assert "(load average 17.2 on 2 cores" in issue17_section(h, {}) and "pending" in issue17_section(h, {})


class _Run:
    """What report_sections reads of report.py's Run: a finished bench and its JSON."""

    def __init__(self, data: dict):
        self.shown, self.ok, self.out = "python bench/bench_disk.py --json", True, json.dumps(data)

    def json(self):
        return json.loads(self.out)


def test_the_disk_section_shows_each_block_size_beside_its_limits_and_the_cpu_bound(tmp_path):
    pytest.importorskip("matplotlib")
    from report_sections import section_disk

    row = {"block": 2 << 20, "bytes": 1 << 30, "kvbm_write_s": 0.25, "kvbm_read_s": 0.5, "nixl_write_s": 0.2,
           "nixl_read_s": 0.25, "ratio_nixl_write": 0.8, "ratio_nixl_read": 0.5, "ratio_nixl_io_only_write": 1.1,
           "ratio_nixl_io_only_read": 1.2, "ratio_nixl_io_other_crc_write": 0.9, "ratio_nixl_io_other_crc_read": 1.0,
           "cpu_s_per_gib": {"kvbm_write": 0.1}, "steal": {"kvbm_write": 0.25}}
    disk = {"limits": {"dd_write_s": 0.5, "dd_read_s": 1.0}, "rows": [row], "nixl": "ok"}
    text, limits = section_disk(_Run(disk), tmp_path, tmp_path / "RESULTS.md")
    # 1 GiB in 0.25 s = 4.29 GB/s; dd's 0.5 s over kvbm's 0.25 s = 2.00; NIXL: the paired median as given
    assert "| 2048 KiB | 4.29 | 2.00 | - | 0.80 | 2.15 | 2.00 | - | 0.50 |" in text
    assert "2048 KiB: write 1.10×, read 1.20×" in text  # native I/O alone
    assert "other memory" in text and "2048 KiB: write 0.90×, read 1.00×" in text
    assert "kvbm_write 0.10 s (25%)" in text
    assert limits["_bytes"] == 1 << 30 and (tmp_path / "disk.png").exists()
