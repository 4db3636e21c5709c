"""End to end: a tiny Gemma 3 (sliding-window + full attention) in vLLM's CPU build with its
hybrid memory allocator and the kvbm connector (tests/hybrid_e2e.py, in a fresh process).

Mamba is not run end to end: vLLM 0.32's CPU build fails in its own Mamba prefix caching
("align" mode, which kvbm needs) for a tiny NemotronH, with or without kvbm. The Mamba cases
run against vLLM's real Scheduler and objects instead: tests/test_hybrid_scheduler.py and
tests/test_hybrid_connector.py (test_mamba_*).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")


def test_gemma3_hybrid_end_to_end(tmp_path):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "hybrid_e2e.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("E2E ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    r = json.loads(line[0][4:])
    # vLLM kept its hybrid allocator (one group per layer type) and used the hybrid connector
    assert r["classes"] == ["KVBMHybridConnector"] * 2
    assert sorted(set(r["groups"])) == ["FullAttentionSpec", "SlidingWindowSpec"]
    assert r["manifest"]["kinds"].count("sliding") == 3 and r["manifest"]["kinds"].count("full") == 1
    ref = r["a_cold"]["ids"]
    assert r["a_cold"]["cached"] == 0 and len(ref) == 16
    # served from kvbm (G2): 8 whole pages, greedy output identical to the recompute
    assert r["a_warm"]["cached"] == 8 * 128 and r["a_warm"]["ids"] == ref
    # G3 lost page 7's sliding piece (bytes on disk): that page fails its checksum, the load
    # cannot bring every piece, so the request is recomputed whole, never partly restored
    assert r["a_piece_lost"]["cached"] == 0 and r["a_piece_lost"]["ids"] == ref and r["piece_lost_dropped"]
    # A's pages (page 7 stored again by that recompute) demoted to G3, served from there
    assert r["a_in_g3"] == 8 and r["g3_hits"] >= 8
    assert r["a_from_g3"]["cached"] == 8 * 128 and r["a_from_g3"]["ids"] == ref
    # a page gone from kvbm: the hit ends before it; a load short of a page: all recomputed
    assert r["a_dropped"]["cached"] == 7 * 128 and r["a_dropped"]["ids"] == ref
    assert r["a_refilled"]["cached"] == 8 * 128 and r["a_refilled"]["ids"] == ref
    assert r["a_short_load"]["cached"] == 0 and r["a_short_load"]["ids"] == ref
    # flips in one group's piece: outside the last window nothing reads them; inside, and in
    # the full-attention piece, the output changes (the pieces are really used)
    assert r["a_pages_in_g2"] == 8
    assert r["flip_sliding_outside"]["cached"] == 8 * 128 and r["flip_sliding_outside"]["ids"] == ref
    assert r["flip_sliding_window"]["cached"] == 8 * 128 and r["flip_sliding_window"]["ids"] != ref
    assert r["flip_full"]["cached"] == 8 * 128 and r["flip_full"]["ids"] != ref
    assert r["a_restored"]["ids"] == ref
