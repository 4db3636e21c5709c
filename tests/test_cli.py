"""`kvbm simulate` as a user runs it: JSON output, sweeps, plots, and errors that say what to fix."""

import json
import re

import pytest

from kvbm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_json_has_the_documented_fields(capsys):
    code, out, _ = run(capsys, "simulate", "mooncake", "--limit", "3000", "--tier", "g2=2000:lru",
                       "--tier", "g3=20000:frequency", "--json", "--quiet")
    assert code == 0
    res = json.loads(out)
    assert res["requests"] == 3000
    assert res["block_accesses"] > 0
    for key in ("block_hit_ratio", "prefix_hit_ratio"):
        assert 0 < res[key] < 1
    assert set(res["tiers"]) == {"g2", "g3"}
    for tier in res["tiers"].values():
        for key in ("block_hits", "prefix_hits", "hits", "stores", "evictions"):
            assert isinstance(tier[key], int)
    assert res["tiers"]["g2"]["evictions"] == res["tiers"]["g3"]["demotions_in"] + res["tiers"]["g2"]["drops"]
    assert res["prefix_hits"] == res["tiers"]["g2"]["prefix_hits"] + res["tiers"]["g3"]["prefix_hits"]


def test_simulate_offload_keeps_the_headroom_free(capsys):
    # --offload models the connectors' background demotion: G2 keeps 2000/16 = 125 blocks free
    code, out, _ = run(capsys, "simulate", "mooncake", "--limit", "3000", "--tier", "g2=2000:lru",
                       "--tier", "g3=20000:lru", "--offload", "--quiet")
    assert code == 0
    assert "offload          headroom kept free by early demotion: g2 125 blocks" in out
    assert re.search(r"^g2\s+2,000\s+1,875\s", out, re.M)  # capacity, used


def test_byte_capacity_with_a_layout(capsys):
    # llama3-8b at 512-token blocks: 64 MiB per block, so 1 GiB = 16 blocks
    code, out, _ = run(capsys, "simulate", "mooncake", "--limit", "200", "--tier", "g2=1GiB:lru",
                       "--layout", "llama3-8b", "--json", "--quiet")
    assert code == 0
    res = json.loads(out)
    assert res["tiers"]["g2"]["capacity"] == 16
    assert res["block_nbytes"] == 64 * 2**20


def test_sweep_prints_a_table_and_plots(capsys, tmp_path):
    png = tmp_path / "sweep.png"
    code, out, _ = run(capsys, "simulate", "mooncake", "--limit", "2000", "--sweep", "500,2000",
                       "--policy", "lru,fifo,belady", "--plot", str(png), "--jobs", "1", "--quiet")
    assert code == 0
    assert "prefix_hit_ratio" in out and "belady" in out
    assert png.stat().st_size > 10_000
    code, out, _ = run(capsys, "simulate", "mooncake", "--limit", "2000", "--sweep", "500,2000",
                       "--policy", "lru,belady", "--json", "--jobs", "2", "--quiet")
    rows = json.loads(out)["sweep"]
    assert [(r["policy"], r["capacity"]) for r in rows] == [("lru", 500), ("lru", 2000), ("belady", 500), ("belady", 2000)]
    assert rows[2]["prefix_hit_ratio"] >= rows[0]["prefix_hit_ratio"]


@pytest.mark.parametrize("argv, message", [
    (["--tier", "g2=0:lru"], "capacity must be at least one block"),
    (["--tier", "g2=-3:lru"], "capacity must be at least one block"),
    (["--tier", "g3=10:lru", "--tier", "g2=10:lru"], "tiers are out of order"),
    (["--tier", "g2=10:lruu"], "unknown eviction policy 'lruu' (did you mean 'lru'?); registered: arc, "),
    (["--sweep", "10", "--policy", "nope"], "unknown eviction policy 'nope'"),
    (["--tier", "g2=4GiB:lru"], "give a `layout` (or --layout)"),
    (["--tier", "g7=10"], "tier must be one of g1, g2, g3, g4"),
    (["--tier", "g2"], "write NAME=CAPACITY"),
])
def test_bad_arguments_name_what_to_fix(capsys, argv, message):
    code, _, err = run(capsys, "simulate", "mooncake", "--limit", "10", "--quiet", *argv)
    assert code == 2
    assert message in err


def test_malformed_trace_names_file_and_line(capsys, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, 2]}\n'
                 '{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": "x"}\n')
    code, _, err = run(capsys, "simulate", str(f), "--quiet")
    assert code == 2
    assert "t.jsonl:2:" in err and "hash_ids" in err


def test_unknown_config_key_in_a_file(capsys, tmp_path):
    f = tmp_path / "kvbm.yaml"
    f.write_text("tiers: [{name: g2, capacity: 10, evction: lru}]\n")
    code, _, err = run(capsys, "simulate", "mooncake", "--config", str(f), "--limit", "10", "--quiet")
    assert code == 2
    assert "unknown config key tiers[0].'evction' (did you mean 'eviction'?)" in err
    assert "kvbm.yaml" in err


def test_policies_lists_every_builtin(capsys):
    code, out, _ = run(capsys, "policies")
    assert code == 0
    for name in ("lru", "fifo", "frequency", "priority", "arc", "s3fifo", "prefix", "belady",
                 "always", "n_hit", "priority_floor"):
        assert f"  {name} " in out


def test_demo_moves_real_bytes_and_verifies_them(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--requests", "120", "--g2", "40", "--g3", "80", "--g4", "400",
                       "--workdir", str(tmp_path), "--json", "--quiet")
    res = json.loads(out)
    assert code == 0
    assert res["mismatched_blocks"] == 0 and res["failed_loads"] == 0
    assert res["verified_blocks"] > 0
    # blocks travelled every path: stored into G2, demoted to G3 and G4, and loaded back
    for path in ("buffer->host", "host->disk", "disk->object", "host->buffer"):
        assert res["transfers"][path]["blocks"] > 0, path
    assert res["tiers"]["g4"]["demotions_in"] > 0
    assert (tmp_path / "g3").exists() and (tmp_path / "g4").exists()


def test_demo_rejects_a_zero_capacity(capsys):
    code, _, err = run(capsys, "demo", "--g3", "0", "--quiet")
    assert code == 2 and "--g3 must be positive" in err


def test_plot_without_matplotlib_says_what_to_install_before_replaying(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import now fails
    code, _, err = run(capsys, "simulate", "mooncake", "--sweep", "100", "--plot", str(tmp_path / "p.png"), "--quiet")
    assert code == 2 and "pip install 'kvbm-tiered[plot]'" in err
