"""Token-id prompts with a trace's prefix structure.

Each hash id of a trace names one block of `block_size` tokens; the same id always gives the
same run of token ids (a seeded generator keyed by the id), so two requests sharing their
first k hash ids share a k-block token prefix, and a server's prefix cache sees exactly the
sharing the trace recorded. A prompt is `input_length` tokens: the blocks' runs, the last one
cut short; an input longer than its blocks is padded with a run keyed by the request's index
(unique to it). `max_input` cuts every prompt (a small model's context), keeping its prefix.
"""

from __future__ import annotations

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
