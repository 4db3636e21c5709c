"""Hybrid presets: bytes per page sum every group's piece; the simulator sizes tiers in pages."""

import subprocess
import sys

from kvbm.cli import parse_layout
from kvbm.config import parse_capacity
from kvbm.hybrid_presets import HYBRID_PRESETS, hybrid_manifest, plain_layout


def test_gpt_oss_20b_page_bytes():
    m = hybrid_manifest("gpt-oss-20b", 16)
    # 24 layers (12 sliding, window 128; 12 full) x K and V x 16 tokens x 8 heads x 64 x bf16
    assert m.page_nbytes == 24 * 2 * 16 * 8 * 64 * 2 == 786_432
    assert [(p.kind, len(p.buffers), p.window) for p in m.pieces] == [("sliding", 12, 128), ("full", 12, 0)]
    assert parse_layout("gpt-oss-20b", 16).block_nbytes == m.page_nbytes == plain_layout("gpt-oss-20b", 16).block_nbytes
    # a 4096-token hit reads every full page but only the sliding pieces of the last 8 pages
    needed = m.needed_nbytes(256)
    assert needed == 256 * 12 * 32_768 + 8 * 12 * 32_768


def test_gemma3_12b_page_bytes():
    m = hybrid_manifest("gemma3-12b", 32)
    assert m.page_nbytes == 48 * 2 * 32 * 8 * 256 * 2
    assert m.tail_pages(m.pieces[0]) == 32  # ceil(1023 / 32)


def test_byte_capacities_are_pages():
    layout = parse_layout("gemma3-27b", 16)
    assert parse_capacity("64GiB", layout) == (64 << 30) // (62 * 2 * 16 * 16 * 128 * 2)
    assert set(HYBRID_PRESETS) >= {"gpt-oss-20b", "gemma3-12b"}


def test_simulate_takes_a_hybrid_preset(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvbm.cli", "simulate", "tests/data/mooncake_small.jsonl",
                           "--layout", "gpt-oss-20b", "--tier", "g2=8GiB:lru", "--json", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    r = json.loads(proc.stdout)
    page = 786_432 // 16 * 512  # the trace's 512-token blocks
    assert r["tiers"]["g2"]["capacity"] == (8 << 30) // page
