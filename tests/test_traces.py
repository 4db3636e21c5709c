"""Trace readers/writers, the synthetic generator and the sweep plot."""

import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from kvbm.sim import synth  # noqa: E402
from kvbm.sim.traces import FORMATS, Request, Trace, TraceError, load_trace, write_trace  # noqa: E402

DATA = Path(__file__).parent / "data"
BUNDLED = ROOT / "kvbm" / "sim" / "data" / "mooncake_conversation.jsonl"  # a copy of ../shared/traces
MOONCAKE = DATA / "mooncake_small.jsonl"
BAILIAN = DATA / "bailian_small.jsonl"


# ---------------------------------------------------------------- real trace


def test_bundled_mooncake_trace_loads_with_known_counts():
    trace = load_trace(BUNDLED)
    assert trace.format == "mooncake" and trace.block_size == 512
    assert len(trace.requests) == 12_031
    assert trace.block_accesses == 288_500
    assert trace.distinct_blocks == 182_790
    # ms in the file, seconds in memory: the last request arrives at 3,536,999 ms.
    assert trace.requests[-1].timestamp == pytest.approx(3536.999)


def test_limit_keeps_the_first_requests():
    trace = load_trace(BUNDLED, limit=10)
    assert len(trace.requests) == 10
    assert trace.requests[0].hash_ids[:3] == (0, 1, 2)


# ---------------------------------------------------------------- fixtures and round trips


def test_mooncake_fixture_converts_ms_to_seconds():
    trace = load_trace(MOONCAKE)
    assert trace.format == "mooncake" and trace.block_size == 512
    assert [r.timestamp for r in trace.requests] == [0.0, 0.0, 669.0, 669.0]
    assert trace.requests[2] == Request(669.0, (0, 36636, 38787), 1504, 462)
    assert trace.requests[0].chat_id is None and trace.requests[0].turn is None


def test_bailian_fixture_fields_and_units():
    trace = load_trace(BAILIAN)  # one empty line inside is skipped
    assert trace.format == "bailian" and trace.block_size == 16
    assert len(trace.requests) == 5
    third = trace.requests[2]
    assert third == Request(61.114, (0, 1, 5, 6, 7), 70, 132, chat_id=2, parent_chat_id=0,
                            type="text", turn=2)
    assert trace.requests[0].parent_chat_id == -1  # root request, as in the release
    assert trace.block_accesses == 3 + 3 + 5 + 1 + 15
    assert trace.distinct_blocks == 20


@pytest.mark.parametrize("fixture", [BAILIAN, MOONCAKE])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet"])
def test_round_trip(tmp_path, fixture, suffix):
    original = load_trace(fixture)
    out = tmp_path / f"copy{suffix}"
    write_trace(original, out)
    again = load_trace(out)
    assert again.requests == original.requests
    assert again.block_size == original.block_size
    assert again.format == ("parquet" if suffix == ".parquet" else original.format)


def test_parquet_keeps_custom_block_size_and_synthetic_metadata(tmp_path):
    trace = synth.generate(n_sessions=20, seed=3, block_size=64, mode="mix")
    write_trace(trace, tmp_path / "synth.parquet")
    again = load_trace(tmp_path / "synth.parquet")
    assert again.requests == trace.requests and again.block_size == 64
    # JSONL carries no block size: the caller says it, else the schema's default.
    write_trace(trace, tmp_path / "synth.jsonl")
    assert load_trace(tmp_path / "synth.jsonl", block_size=64).requests == trace.requests
    assert load_trace(tmp_path / "synth.jsonl").block_size == 16


def test_explicit_format_overrides_detection(tmp_path):
    # A Bailian file read as Mooncake: timestamps are taken as ms.
    trace = load_trace(BAILIAN, format="mooncake")
    assert trace.format == "mooncake" and trace.requests[2].timestamp == pytest.approx(0.061114)
    out = tmp_path / "no_suffix_parquet"
    write_trace(load_trace(MOONCAKE), out, format="parquet")
    assert load_trace(out, format="parquet").requests == load_trace(MOONCAKE).requests


# ---------------------------------------------------------------- bad input


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, 2]}'
BAD_LINES = [
    ('{"timestamp": 0, "input_length": 10', "invalid JSON"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "missing 'hash_ids'"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": "abc"}',
     '\'hash_ids\' must be a list of integers, got "abc"'),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, 2.5]}',
     "'hash_ids' must be a list of integers, got 2.5 at index 1"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [true]}',
     "'hash_ids' must be a list of integers, got true"),
    ('{"timestamp": 0, "input_length": -5, "output_length": 1, "hash_ids": [1]}',
     "'input_length' must be a non-negative integer, got -5"),
    ('{"timestamp": 0, "input_length": 10, "output_length": "7", "hash_ids": [1]}',
     "'output_length' must be a non-negative integer, got \"7\""),
    ('{"timestamp": "soon", "input_length": 10, "output_length": 1, "hash_ids": [1]}',
     "'timestamp' must be a finite number"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [1], "turn": "2"}',
     "'turn' must be an integer"),
    ('{"timestamp": NaN, "input_length": 10, "output_length": 1, "hash_ids": [1]}',
     "'timestamp' must be a finite number, got NaN"),
    ("[1, 2, 3]", "expected a JSON object"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_malformed_line_names_file_line_and_problem(tmp_path, line, problem):
    # The bad record is on line 4: two good lines and an empty one come first.
    path = _write_lines(tmp_path / "trace.jsonl", [GOOD, GOOD, "", line, GOOD])
    with pytest.raises(TraceError) as err:
        load_trace(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert problem in message
    assert isinstance(err.value, ValueError)


def test_hash_ids_beyond_64_bits_are_accepted(tmp_path):
    # orjson (optional speedup) refuses them; the reader falls back to the stdlib parser.
    big = 2**70
    line = f'{{"timestamp": 5, "input_length": 1, "output_length": 1, "hash_ids": [{big}]}}'
    path = _write_lines(tmp_path / "big.jsonl", [line])
    assert load_trace(path).requests[0].hash_ids == (big,)


def test_malformed_first_line_still_reports_line(tmp_path):
    path = _write_lines(tmp_path / "trace.jsonl", ["not json", GOOD])
    with pytest.raises(TraceError, match=r"trace\.jsonl:1: invalid JSON"):
        load_trace(path)


def test_malformed_parquet_row_names_file_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"timestamp": [0, 1], "input_length": [10, -1], "output_length": [1, 1],
                      "hash_ids": [[1], [2]]})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(TraceError, match=r"bad\.parquet: row 2: 'input_length' must be a non-neg"):
        load_trace(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"timestamp": [0]}), tmp_path / "cols.parquet")
    with pytest.raises(TraceError, match=r"cols\.parquet: missing column 'input_length'"):
        load_trace(tmp_path / "cols.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TraceError, match=r"junk\.parquet: not a readable Parquet file"):
        load_trace(tmp_path / "junk.parquet")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace file not found: .*nope.jsonl"):
        load_trace(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError) as err:
        load_trace(MOONCAKE, format="csv")
    assert "'csv'" in str(err.value) and all(f in str(err.value) for f in FORMATS)


# ---------------------------------------------------------------- autodetection


def test_autodetection(tmp_path):
    assert load_trace(MOONCAKE).format == "mooncake"
    assert load_trace(BAILIAN).format == "bailian"
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(BAILIAN.read_text())
    assert load_trace(gz).format == "bailian"
    write_trace(load_trace(BAILIAN), tmp_path / "b.parquet")
    assert load_trace(tmp_path / "b.parquet").format == "parquet"
    # An odd suffix is still JSONL, detected by the first object's keys.
    (tmp_path / "m.txt").write_text(MOONCAKE.read_text())
    assert load_trace(tmp_path / "m.txt").format == "mooncake"
    # An empty file is an empty Mooncake trace, not an error.
    (tmp_path / "empty.jsonl").write_text("\n")
    assert load_trace(tmp_path / "empty.jsonl").requests == []


# ---------------------------------------------------------------- synthetic traffic


@pytest.mark.parametrize("mode", ["chat", "agent", "mix"])
def test_synth_is_deterministic_and_turns_chain(mode):
    trace = synth.generate(n_sessions=40, seed=7, mode=mode)
    assert trace == synth.generate(n_sessions=40, seed=7, mode=mode)
    assert trace.requests != synth.generate(n_sessions=40, seed=8, mode=mode).requests
    assert isinstance(trace, Trace) and trace.block_size == 512

    by_id = {r.chat_id: r for r in trace.requests}
    times = [r.timestamp for r in trace.requests]
    assert times == sorted(times)
    for r in trace.requests:
        assert len(r.hash_ids) == -(-r.input_length // trace.block_size)
        if r.turn == 1:
            assert r.parent_chat_id == -1
            continue
        parent = by_id[r.parent_chat_id]
        assert parent.turn == r.turn - 1 and parent.timestamp < r.timestamp
        # prompt = previous prompt + previous answer + new message
        assert r.hash_ids[: len(parent.hash_ids)] == parent.hash_ids
        assert r.input_length > parent.input_length + parent.output_length


def test_synth_sessions_share_system_prompt_blocks_and_agents_grow_faster():
    chat = synth.generate(n_sessions=100, seed=1, mode="chat")
    first_blocks = [r.hash_ids[0] for r in chat.requests if r.turn == 1]
    assert len(set(first_blocks)) < len(first_blocks)  # Zipf-popular system prompts repeat
    agent = synth.generate(n_sessions=100, seed=1, mode="agent")
    mean_in = lambda t: sum(r.input_length for r in t.requests) / len(t.requests)  # noqa: E731
    assert mean_in(agent) > 2 * mean_in(chat)
    assert {r.type for r in agent.requests} == {"agent"}


def test_synth_respects_context_limit_and_rejects_bad_mode():
    trace = synth.generate(n_sessions=30, seed=2, mode="agent", max_context_tokens=20_000)
    assert max(r.input_length for r in trace.requests) <= 20_000
    with pytest.raises(ValueError, match="unknown mode 'robot'"):
        synth.generate(mode="robot")


# ---------------------------------------------------------------- plot


def test_plot_sweep_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from kvbm.sim.plot import plot_sweep

    caps = [1_000, 10_000, 30_000, 50_000, 100_000]
    ref = {"lru": [0.0445, 0.2112, 0.3257, 0.3546, 0.3637],
           "fifo": [0.0434, 0.1815, 0.2944, 0.3335, 0.3563],
           "belady": [0.191, 0.366, 0.366, 0.366, 0.366]}
    results = [{"policy": p, "capacity": c, "prefix_hit_ratio": v, "block_hit_ratio": v}
               for p, vs in ref.items() for c, v in zip(caps, vs)]
    out = plot_sweep(results, tmp_path / "sweep.png", title="reference")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="has no 'capacity'"):
        plot_sweep([{"policy": "lru", "prefix_hit_ratio": 0.1}], tmp_path / "x.png")


def test_write_trace_jsonl_is_plain_json_per_line(tmp_path):
    write_trace(load_trace(MOONCAKE), tmp_path / "m.jsonl")
    first = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[2])
    assert first == {"timestamp": 669000, "input_length": 1504, "output_length": 462,
                     "hash_ids": [0, 36636, 38787]}


def test_trace_pickles_for_worker_processes():
    import pickle

    trace = load_trace(BAILIAN)
    assert pickle.loads(pickle.dumps(trace)) == trace
