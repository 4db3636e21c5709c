"""Synthetic multi-turn chat and agent traffic, as a `Trace` the simulator replays.

Model (deterministic given `seed`; stdlib `random` only):

- Sessions arrive as a Poisson process (exponential gaps, mean 1/`session_rate` s).
- Each session opens with one of `n_system_prompts` system prompts, picked with Zipf
  popularity (weight 1/k**`zipf_s` for the k-th prompt). The full blocks of a system prompt
  carry the same ids in every session that uses it; the block where it meets the first
  user message is already session-specific.
- Turn 1's prompt is system prompt + user message. Turn k+1's prompt is turn k's prompt +
  turn k's answer + a new message, so its `hash_ids` extend turn k's. A partial last block
  keeps its id when a later turn fills it (real engines would rehash it), which makes the
  trace optimistic by at most one block per turn.
- Chat sessions append a short user message and wait a think time between turns; agent
  sessions append a long tool output and wait only for the tool. The next turn arrives
  `output_length * time_per_output_token` (decode) + think/tool time after the previous.
- A session ends after its turn count (geometric, mean `turns_mean` / `agent_turns_mean`)
  or when its next prompt would pass `max_context_tokens`.

Token counts are lognormal with the given mean (sigma 0.8; system prompts sigma 0.5).
Requests carry Bailian-style metadata: `chat_id` in arrival order, `parent_chat_id` (-1 on
a session's first turn), `turn` from 1, and `type` "chat" or "agent".
"""

from __future__ import annotations

import math
import random

from kvbm.sim.traces import Request, Trace

__all__ = ["generate"]

MODES = ("chat", "agent", "mix")


def _lognormal(rng: random.Random, mean: float, sigma: float = 0.8) -> int:
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


def _geometric(rng: random.Random, mean: float, cap: int = 1000) -> int:
    n = 1
    while n < cap and rng.random() >= 1.0 / max(mean, 1.0):
        n += 1
    return n


def generate(n_sessions: int = 200, seed: int = 0, block_size: int = 512, *,
             mode: str = "chat", agent_fraction: float = 0.5, session_rate: float = 0.5,
             n_system_prompts: int = 8, zipf_s: float = 1.1, system_prompt_tokens: int = 2000,
             turns_mean: float = 4.0, agent_turns_mean: float = 12.0, user_tokens: int = 150,
             output_tokens: int = 300, tool_output_tokens: int = 3000,
             think_time: float = 60.0, tool_time: float = 2.0,
             time_per_output_token: float = 0.03, max_context_tokens: int = 131072) -> Trace:
    """Generate a synthetic trace of `n_sessions` sessions.

    Parameters (defaults in brackets):
        n_sessions [200]: sessions to generate; the trace holds all their turns.
        seed [0]: random seed; equal arguments give an equal trace.
        block_size [512]: tokens per block used to cut prompts into `hash_ids`.
        mode ["chat"]: "chat", "agent", or "mix" (each session is agent with
            probability `agent_fraction`).
        agent_fraction [0.5]: share of agent sessions in "mix" mode.
        session_rate [0.5]: session arrivals per second (Poisson).
        n_system_prompts [8]: distinct system prompts shared across sessions.
        zipf_s [1.1]: Zipf exponent of system-prompt popularity (0 = uniform).
        system_prompt_tokens [2000]: mean system-prompt length in tokens.
        turns_mean [4.0]: mean turns of a chat session (geometric).
        agent_turns_mean [12.0]: mean turns of an agent session (geometric).
        user_tokens [150]: mean tokens of a user message (chat turns, and agent turn 1).
        output_tokens [300]: mean tokens of an answer (`output_length`).
        tool_output_tokens [3000]: mean tokens a tool call appends in agent sessions.
        think_time [60.0]: mean user think time between chat turns, seconds (exponential).
        tool_time [2.0]: mean tool run time between agent turns, seconds (exponential).
        time_per_output_token [0.03]: decode seconds per answer token before the next turn.
        max_context_tokens [131072]: a session ends before its prompt would exceed this.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    if n_sessions < 0 or block_size < 1 or session_rate <= 0 or n_system_prompts < 1:
        raise ValueError("need n_sessions >= 0, block_size >= 1, session_rate > 0, "
                         "n_system_prompts >= 1")
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    sys_lengths = [_lognormal(rng, system_prompt_tokens, 0.5) for _ in range(n_system_prompts)]
    sys_blocks = [fresh(n // block_size) for n in sys_lengths]
    weights = [1.0 / (k + 1) ** zipf_s for k in range(n_system_prompts)]

    # (arrival s, session, turn, hash_ids, input_length, output_length, type)
    turns: list[tuple[float, int, int, tuple[int, ...], int, int, str]] = []
    start = 0.0
    for session in range(n_sessions):
        start += rng.expovariate(session_rate)
        agent = mode == "agent" or (mode == "mix" and rng.random() < agent_fraction)
        kind = "agent" if agent else "chat"
        sp = rng.choices(range(n_system_prompts), weights)[0]
        ids, length = list(sys_blocks[sp]), sys_lengths[sp]
        append, t = _lognormal(rng, user_tokens), start
        for turn in range(1, _geometric(rng, agent_turns_mean if agent else turns_mean) + 1):
            if length + append > max_context_tokens:
                break
            length += append
            ids += fresh(-(-length // block_size) - len(ids))
            out = _lognormal(rng, output_tokens)
            turns.append((t, session, turn, tuple(ids), length, out, kind))
            wait = rng.expovariate(1.0 / (tool_time if agent else think_time))
            t += out * time_per_output_token + wait
            # The next prompt carries this answer plus a tool output or a user message.
            append = out + _lognormal(rng, tool_output_tokens if agent else user_tokens)

    turns.sort(key=lambda x: (x[0], x[1], x[2]))
    chat_ids = {(s, k): i for i, (_, s, k, *_rest) in enumerate(turns)}
    requests = [
        Request(timestamp=t, hash_ids=ids, input_length=n_in, output_length=n_out,
                chat_id=chat_ids[s, k], parent_chat_id=chat_ids.get((s, k - 1), -1),
                type=kind, turn=k)
        for t, s, k, ids, n_in, n_out, kind in turns
    ]
    return Trace(requests=requests, block_size=block_size, format="synthetic",
                 source=f"synth:seed={seed},mode={mode},n_sessions={n_sessions}")
