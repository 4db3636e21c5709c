"""Send a trace's requests to a server at their arrival times; time each streamed response.

    Job          one request to send: when (seconds after the start), prompt, max_tokens
    Result       what happened: sent offset, time to first token, token arrival times, error
    send_all     run every job (asyncio + httpx), each at start + at; a callback per result

A request is a streaming `/v1/completions` call with a token-id prompt: TTFT is the arrival
of the first chunk carrying a token, each later chunk's gap an inter-token latency (a chunk
with n tokens counts n, as its `token_ids` say when the server returns them), end to end the
arrival of `[DONE]`. `ignore_eos` asks the server to produce the trace's output length;
`return_token_ids` (vLLM) counts tokens when the server runs without a tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class Job:
    index: int
    at: float  # seconds after the run starts
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    index: int
    at: float  # scheduled offset
    sent: float = 0.0  # actual offset when the request went out
    ttft: float | None = None
    e2e: float | None = None
    gaps: list[float] = field(default_factory=list)  # inter-token latencies
    output_tokens: int = 0
    input_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None


def _tokens_in(chunk: dict) -> int:
    n = 0
    for choice in chunk.get("choices") or ():
        ids = choice.get("token_ids")
        if ids is not None:
            n += len(ids)
        elif choice.get("text"):
            n += 1
    return n


async def _one(client: Any, url: str, model: str, job: Job, start: float, extra: dict) -> Result:
    res = Result(job.index, job.at, input_tokens=len(job.prompt))
    delay = start + job.at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    t0 = time.perf_counter()
    res.sent = t0 - start
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    last = None
    usage_tokens = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                res.error = f"HTTP {r.status_code}: {text}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                n = _tokens_in(chunk)
                if not n:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.gaps.extend([(now - last) / n] * n)
                last = now
                res.output_tokens += n
        res.e2e = time.perf_counter() - t0
        if usage_tokens is not None:
            res.output_tokens = usage_tokens
        if res.ttft is None:
            res.error = "the stream ended without a token"
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


async def _run(url: str, model: str, jobs: Sequence[Job], on_result: Callable[[Result], None],
               timeout: float, extra: dict) -> list[Result]:
    import httpx

    limits = httpx.Limits(max_connections=max(16, len(jobs)), max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(_one(client, url, model, j, start, extra)) for j in jobs]
        results = []
        for fut in asyncio.as_completed(tasks):
            res = await fut
            on_result(res)
            results.append(res)
    return sorted(results, key=lambda r: r.index)


def send_all(url: str, model: str, jobs: Sequence[Job], on_result: Callable[[Result], None] = lambda r: None,
             timeout: float = 600.0, extra: dict | None = None) -> list[Result]:
    """Send every job at its offset (concurrently, as arrivals overlap); results in job order."""
    return asyncio.run(_run(url.rstrip("/"), model, jobs, on_result, timeout, dict(extra or {})))
