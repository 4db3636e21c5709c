"""Token-id prompts with a trace's prefix structure.

    block_tokens(hash_id, ...)    the run of token ids of one hash id
    prompt_tokens(hash_ids, ...)  one request's prompt
    trace_jobs(trace, speed, ...) every request of a trace as a sender Job (arrival, prompt, output)

Each hash id of a trace names one block of `block_size` tokens; the same id always gives the
same run of token ids (a seeded generator keyed by the id), so two requests sharing their
first k hash ids share a k-block token prefix, and a server's prefix cache sees exactly the
sharing the trace recorded. A prompt is `input_length` tokens: the blocks' runs, the last one
cut short; an input longer than its blocks is padded with a run keyed by the request's index
(unique to it). `max_input` cuts every prompt (a small model's context), keeping its prefix.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

FIRST_ID = 10  # below: special tokens of most vocabularies


@lru_cache(maxsize=65536)
def block_tokens(hash_id: int, block_size: int, vocab: int, seed: int = 0) -> tuple[int, ...]:
    """The run of token ids of one hash id (deterministic, in [FIRST_ID, vocab))."""
    rng = np.random.default_rng([seed, 1, int(hash_id) & (2**63 - 1)])
    return tuple(int(t) for t in rng.integers(FIRST_ID, vocab, block_size))


def prompt_tokens(hash_ids, input_length: int, block_size: int, vocab: int, index: int,
                  max_input: int | None = None, seed: int = 0) -> list[int]:
    """The token ids of one request: its blocks' runs, cut to input_length (and max_input)."""
    n = max(1, input_length if max_input is None else min(input_length, max_input))
    out: list[int] = []
    for h in hash_ids:
        if len(out) >= n:
            break
        out.extend(block_tokens(h, block_size, vocab, seed))
    if len(out) < n:  # more tokens than blocks: this request's own tail
        rng = np.random.default_rng([seed, 2, index])
        out.extend(int(t) for t in rng.integers(FIRST_ID, vocab, n - len(out)))
    return out[:n]


def trace_jobs(trace, speed: float = 1.0, vocab: int = 1000, max_input: int | None = None,
               max_output: int | None = None) -> list:
    """One sender Job per trace request: its arrival offset divided by speed (inf: all at 0),
    its prompt, its output length (capped by max_output)."""
    from .sender import Job

    t_first = trace.requests[0].timestamp if trace.requests else 0.0
    jobs = []
    for i, r in enumerate(trace.requests):
        at = 0.0 if math.isinf(speed) else (r.timestamp - t_first) / speed
        out = max(1, r.output_length if max_output is None else min(r.output_length, max_output))
        jobs.append(Job(i, at, prompt_tokens(r.hash_ids, r.input_length, trace.block_size, vocab, i, max_input),
                        out))
    return jobs
