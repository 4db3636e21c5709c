"""`kvbm replay` against a stub OpenAI-compatible server in this process.

The stub streams `max_tokens` tokens per /v1/completions request (one chunk each, after a
fixed delay before the first), records what it was sent and when, fails the requests whose
prompt starts with a marker token, and counts 128 "external prefix cache hit" tokens per
request on its /metrics. Assertions are on exact counts and on lower bounds of timings
(a request never goes out before its arrival time), never on how fast anything ran.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("httpx")

from kvbm.cli import main
from kvbm.loadgen.prompts import block_tokens, prompt_tokens
from kvbm.loadgen.report import parse_metrics, percentile, summarize
from kvbm.loadgen.sender import Result

FIRST_TOKEN_DELAY = 0.05


class Stub:
    def __init__(self) -> None:
        self.received: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self.requests = 0
        self.fail_token = -1  # a prompt starting with this token gets HTTP 500
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                if self.path == "/v1/models":
                    body = json.dumps({"data": [{"id": "stub-model"}]}).encode()
                elif self.path == "/metrics":
                    with stub.lock:
                        n = stub.requests
                    body = ("# HELP vllm:external_prefix_cache_hits_total x\n"
                            f'vllm:external_prefix_cache_hits_total{{engine="0"}} {128.0 * n}\n'
                            f'vllm:external_prefix_cache_hits_total{{engine="1"}} {1.0 * n}\n'
                            f'vllm:prefix_cache_queries_total{{engine="0"}} {1000.0 * n}\n'
                            "vllm:num_requests_running 3\n").encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.received.append((time.perf_counter(), req))
                    stub.requests += 1
                if req["prompt"][0] == stub.fail_token:
                    self.send_error(500, "stub failure")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                time.sleep(FIRST_TOKEN_DELAY)
                for i in range(req["max_tokens"]):
                    chunk = {"choices": [{"index": 0, "text": "", "token_ids": [100 + i]}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                usage = {"choices": [], "usage": {"completion_tokens": req["max_tokens"]}}
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def _trace(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [  # mooncake: timestamps in ms, 512-token blocks
    {"timestamp": 0, "input_length": 1100, "output_length": 4, "hash_ids": [1, 2, 3]},
    {"timestamp": 300, "input_length": 1024, "output_length": 3, "hash_ids": [1, 2]},  # shares 2 blocks
    {"timestamp": 600, "input_length": 700, "output_length": 5, "hash_ids": [9, 10]},
    {"timestamp": 900, "input_length": 1600, "output_length": 2, "hash_ids": [1, 2, 3]},  # longer than 3 blocks
]


def test_replay_sends_the_trace_with_its_prefix_structure(stub, tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", ROWS)
    rc = main(["replay", trace, "--url", stub.url, "--speed", "3", "--json", "--quiet", "--vocab", "500"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["requests"], report["completed"], report["failed"]) == (4, 4, 0)
    assert report["model"] == "stub-model"
    assert report["output_tokens"] == 4 + 3 + 5 + 2
    assert report["input_tokens"] == 1100 + 1024 + 700 + 1600
    # the server saw each request once, streaming, with the trace's lengths and prefixes
    got = sorted((r for _, r in stub.received), key=lambda r: len(r["prompt"]))
    by_len = {len(r["prompt"]): r for r in got}
    assert sorted(by_len) == [700, 1024, 1100, 1600]
    assert all(r["stream"] and r["model"] == "stub-model" and r["ignore_eos"] for r in got)
    assert [by_len[n]["max_tokens"] for n in (1100, 1024, 700, 1600)] == [4, 3, 5, 2]
    a, b, c, d = by_len[1100]["prompt"], by_len[1024]["prompt"], by_len[700]["prompt"], by_len[1600]["prompt"]
    assert a[:1024] == b  # two shared blocks of 512 tokens
    assert d[:1100] == a[:1100] and d[1536:] != a[1536:1600]  # same 3 blocks, then its own tail
    assert a[1024:1100] == list(block_tokens(3, 512, 500)[:76])  # the last block cut short
    assert c[:512] != a[:512] and all(10 <= t < 500 for t in a + b + c + d)
    # arrival pacing: each request went out no earlier than its trace time / speed, in order
    sent = report["arrivals_s"]
    for s, row in zip(sent, ROWS):
        assert s >= row["timestamp"] / 1000 / 3 - 1e-3
    assert sent == sorted(sent)
    # every TTFT includes the stub's delay before the first token; e2e after it
    assert report["ttft_s"]["p50"] >= FIRST_TOKEN_DELAY
    assert report["e2e_s"]["p99"] >= report["ttft_s"]["p99"]
    assert report["output_tokens_per_s"] > 0
    # the server's counters over the run, summed over label sets (4 requests)
    assert report["server_metrics"]["vllm:external_prefix_cache_hits"] == 4 * 129
    assert report["server_metrics"]["vllm:prefix_cache_queries"] == 4 * 1000


def test_replay_limit_failures_and_text_report(stub, tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", ROWS)
    stub.fail_token = block_tokens(9, 512, 1000)[0]  # the third request's first token: HTTP 500
    rc = main(["replay", trace, "--url", stub.url, "--speed", "inf", "--limit", "3", "--quiet",
               "--max-input", "600", "--max-output", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "requests 3  completed 2  failed 1" in out
    assert "HTTP 500" in out
    assert "vllm:external_prefix_cache_hits 387" in out  # 3 requests x 129
    assert sorted(len(r["prompt"]) for _, r in stub.received) == [600, 600, 600]
    assert sorted(r["max_tokens"] for _, r in stub.received) == [2, 2, 2]


def test_replay_plot(stub, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    trace = _trace(tmp_path / "t.jsonl", ROWS[:2])
    png = tmp_path / "cdf.png"
    assert main(["replay", trace, "--url", stub.url, "--speed", "inf", "--quiet", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--url", "localhost:8000"], "--url must be http://"),
    (["--url", "http://x", "--speed", "0"], "--speed must be > 0"),
    (["--url", "http://x", "--limit", "-1"], "--limit must be >= 0"),
    (["--url", "http://x", "--max-input", "0"], "--max-input must be >= 1"),
    (["--url", "http://127.0.0.1:9"], "cannot list the models of http://127.0.0.1:9"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    trace = _trace(tmp_path / "t.jsonl", ROWS)
    assert main(["replay", trace, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_bad_trace_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5}\n')
    assert main(["replay", str(bad), "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl" in err and "\n" not in err
    assert main(["replay", str(tmp_path / "missing.jsonl"), "--url", "http://127.0.0.1:9"]) == 2
    assert "not found" in capsys.readouterr().err


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (5.0, 9.0, 10.0)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None
    results = [Result(i, 0.0, ttft=0.1 * (i + 1), e2e=1.0 + i, gaps=[0.01] * 3, output_tokens=4,
                      input_tokens=10) for i in range(10)]
    results.append(Result(10, 0.0, error="HTTP 500: x"))
    rep = summarize(results, duration=2.0)
    assert (rep["requests"], rep["completed"], rep["failed"]) == (11, 10, 1)
    assert rep["ttft_s"]["p50"] == pytest.approx(0.5) and rep["ttft_s"]["p99"] == pytest.approx(1.0)
    assert rep["e2e_s"]["p90"] == 9.0 and rep["itl_s"]["p50"] == 0.01
    assert rep["output_tokens_per_s"] == 20.0 and rep["server_metrics"] is None


def test_metrics_parser_sums_label_sets():
    text = ('# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{engine="0"} 5.0\n'
            'vllm:prefix_cache_hits_total{engine="1"} 7.0\nvllm:prefix_cache_hits_created{engine="0"} 1.7e9\n'
            'kvbm_hits_total 3\nother_total 9\n')
    assert parse_metrics(text) == {"vllm:prefix_cache_hits": 12.0, "kvbm_hits": 3.0}


def test_prompts_are_deterministic():
    a = prompt_tokens([5, 6], 900, 512, 1000, index=0)
    assert a == prompt_tokens([5, 6], 900, 512, 1000, index=99)  # no tail: same tokens
    assert len(a) == 900 and a[:512] == list(block_tokens(5, 512, 1000))
    tail1 = prompt_tokens([5], 600, 512, 1000, index=1)
    tail2 = prompt_tokens([5], 600, 512, 1000, index=2)
    assert tail1[:512] == tail2[:512] and tail1[512:] != tail2[512:]
    assert prompt_tokens([5], 0, 512, 1000, index=0) == [block_tokens(5, 512, 1000)[0]]
