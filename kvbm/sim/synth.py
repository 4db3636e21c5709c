"""A family of synthetic LLM workloads, as `Trace`s the simulator replays.

    generate(n_sessions, seed, mode=..., **knobs)   one trace (deterministic given its arguments)
    WORKLOADS                                      named knob settings (the policy grid's rows)
    workload(name, seed=None)                      generate(**WORKLOADS[name]) with an optional seed

Model (stdlib `random` only):

- Sessions arrive as a Poisson process (exponential gaps, mean 1/`session_rate` s). A session
  is a *chat* (short user messages, a think time between turns), an *agent* (a tool loop: each
  turn appends the answer and a long tool output, the next turn follows after the tool's run
  time, so the context grows fast), or a *doc* session (document QA / RAG: a document, shared
  across sessions with Zipf popularity, then short questions with think times).
- Each session opens with one of its tenant's `n_system_prompts` system prompts (Zipf
  popularity, exponent `zipf_s`). The full blocks of a system prompt carry the same ids in
  every session that uses it; the block where it meets the next segment is session-specific.
  A doc session's prompt is system prompt + document + question: the document's full blocks
  are shared only by sessions with the same system prompt *and* document (chained hashes).
- Turn k+1's prompt is turn k's prompt + turn k's answer + a new message, so its `hash_ids`
  extend turn k's. A partial last block keeps its id when a later turn fills it (real
  engines would rehash it), which makes a trace optimistic by at most one block per turn.
- Fan-out: at each agent turn, with probability `fanout_prob`, the agent runs `fanout` parallel
  branches from the same context (sub-agents, parallel tool calls, best-of-n); each branch is
  a turn with its own continuation, and the session goes on from one of them.
- Tenants: `n_tenants` tenants with disjoint system prompts and documents (as separate
  namespaces would be); a session belongs to tenant k with Zipf weight 1/k**`tenant_zipf_s`.
- A session ends after its turn count (geometric, mean `turns_mean` for chat and doc,
  `agent_turns_mean` for agents) or when its next prompt would pass `max_context_tokens`.

Token counts are lognormal with the given mean (sigma 0.8; system prompts and documents 0.5).
Requests carry Bailian-style metadata: `chat_id` in arrival order, `parent_chat_id` (-1 on a
session's first turn), `turn` from 1, and `type` "chat", "agent" or "doc".
Knobs left at their defaults draw no random numbers, so traces made before a knob existed
are unchanged.
"""

from __future__ import annotations

import math
import random

from kvbm.sim.traces import Request, Trace

__all__ = ["generate", "workload", "WORKLOADS", "MODES"]

MODES = ("chat", "agent", "mix", "doc", "blend")
KINDS = ("chat", "agent", "doc")

#: Named workloads, one per row of the policy robustness grid (bench/eval_policies.py). Sizes
#: are chosen so each trace has 60k-250k block accesses (a replay takes seconds).
WORKLOADS: dict[str, dict] = {
    # multi-turn chat: Zipf system prompts, users think ~60 s between turns
    "chat": dict(n_sessions=3000, seed=1, mode="chat"),
    # coding agents: tool loops of ~12 turns, each appending ~3k tokens of tool output
    "agent": dict(n_sessions=120, seed=2, mode="agent"),
    # half chat, half agent
    "mix": dict(n_sessions=300, seed=3, mode="mix"),
    # document QA: 200 documents of ~8k tokens, Zipf popular, 3 questions a session
    "docqa": dict(n_sessions=1500, seed=4, mode="doc", n_documents=200, doc_tokens=8000, turns_mean=3.0),
    # agents that fan out into 4 parallel branches at a quarter of their turns
    "fanout": dict(n_sessions=80, seed=5, mode="agent", fanout_prob=0.25, fanout=4),
    # a shared node: 6 tenants, chat, agents and document QA, Zipf tenant sizes
    "tenants": dict(n_sessions=600, seed=6, mode="blend", kind_weights=(0.5, 0.25, 0.25),
                    n_tenants=6, n_documents=60, doc_tokens=6000),
    # chat with short think times and few, long system prompts (an assistant product)
    "assistant": dict(n_sessions=1200, seed=7, mode="chat", n_system_prompts=3,
                      system_prompt_tokens=6000, think_time=15.0, turns_mean=6.0),
    # RAG: many small documents, rarely reused, beside chat
    "rag": dict(n_sessions=2000, seed=8, mode="blend", kind_weights=(0.5, 0.0, 0.5),
                n_documents=2000, doc_tokens=3000, doc_zipf_s=0.6),
    # long agent sessions (requests of 10,000+ blocks): the cost bench's trace
    "long-agent": dict(n_sessions=24, seed=9, mode="agent", agent_turns_mean=60.0,
                       tool_output_tokens=80000, max_context_tokens=8_000_000, session_rate=0.05),
}


def workload(name: str, seed: int | None = None) -> Trace:
    """The named workload of WORKLOADS (another seed draws another trace of the same kind)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of: {', '.join(WORKLOADS)}")
    knobs = dict(WORKLOADS[name])
    if seed is not None:
        knobs["seed"] = seed
    return generate(**knobs)


def _lognormal(rng: random.Random, mean: float, sigma: float = 0.8) -> int:
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


def _geometric(rng: random.Random, mean: float, cap: int = 1000) -> int:
    n = 1
    while n < cap and rng.random() >= 1.0 / max(mean, 1.0):
        n += 1
    return n


def _zipf(k: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(k)]


def generate(n_sessions: int = 200, seed: int = 0, block_size: int = 512, *,
             mode: str = "chat", agent_fraction: float = 0.5,
             kind_weights: tuple[float, float, float] | None = None, session_rate: float = 0.5,
             n_system_prompts: int = 8, zipf_s: float = 1.1, system_prompt_tokens: int = 2000,
             turns_mean: float = 4.0, agent_turns_mean: float = 12.0, user_tokens: int = 150,
             output_tokens: int = 300, tool_output_tokens: int = 3000,
             think_time: float = 60.0, tool_time: float = 2.0,
             time_per_output_token: float = 0.03, max_context_tokens: int = 131072,
             n_documents: int = 100, doc_tokens: int = 8000, doc_zipf_s: float = 1.0,
             fanout_prob: float = 0.0, fanout: int = 4,
             n_tenants: int = 1, tenant_zipf_s: float = 1.0) -> Trace:
    """Generate a synthetic trace of `n_sessions` sessions.

    Parameters (defaults in brackets):
        n_sessions [200]: sessions to generate; the trace holds all their turns.
        seed [0]: random seed; equal arguments give an equal trace.
        block_size [512]: tokens per block used to cut prompts into `hash_ids`.
        mode ["chat"]: "chat", "agent", "doc" (every session of that kind), "mix" (agent with
            probability `agent_fraction`, else chat) or "blend" (kind drawn by `kind_weights`).
        agent_fraction [0.5]: share of agent sessions in "mix" mode.
        kind_weights [None]: (chat, agent, doc) weights in "blend" mode.
        session_rate [0.5]: session arrivals per second (Poisson).
        n_system_prompts [8]: distinct system prompts per tenant.
        zipf_s [1.1]: Zipf exponent of system-prompt popularity (0 = uniform).
        system_prompt_tokens [2000]: mean system-prompt length in tokens.
        turns_mean [4.0]: mean turns of a chat or doc session (geometric).
        agent_turns_mean [12.0]: mean turns of an agent session (geometric).
        user_tokens [150]: mean tokens of a user message (chat and doc turns, agent turn 1).
        output_tokens [300]: mean tokens of an answer (`output_length`).
        tool_output_tokens [3000]: mean tokens a tool call appends in agent sessions.
        think_time [60.0]: mean user think time between chat and doc turns, s (exponential).
        tool_time [2.0]: mean tool run time between agent turns, seconds (exponential).
        time_per_output_token [0.03]: decode seconds per answer token before the next turn.
        max_context_tokens [131072]: a session ends before its prompt would exceed this.
        n_documents [100]: distinct documents per tenant for doc sessions.
        doc_tokens [8000]: mean document length in tokens.
        doc_zipf_s [1.0]: Zipf exponent of document popularity.
        fanout_prob [0.0]: chance that an agent turn fans out into parallel branches.
        fanout [4]: branches of a fan-out (one continues the session).
        n_tenants [1]: tenants with disjoint prompts and documents.
        tenant_zipf_s [1.0]: Zipf exponent of tenant sizes (sessions per tenant).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    if n_sessions < 0 or block_size < 1 or session_rate <= 0 or n_system_prompts < 1:
        raise ValueError("need n_sessions >= 0, block_size >= 1, session_rate > 0, "
                         "n_system_prompts >= 1")
    if n_tenants < 1 or n_documents < 1 or fanout < 1 or not 0 <= fanout_prob <= 1:
        raise ValueError("need n_tenants >= 1, n_documents >= 1, fanout >= 1, 0 <= fanout_prob <= 1")
    if mode == "blend" and (kind_weights is None or len(kind_weights) != 3 or min(kind_weights) < 0
                            or sum(kind_weights) <= 0):
        raise ValueError("mode 'blend' needs kind_weights=(chat, agent, doc), non-negative, not all 0")
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    # per tenant: system prompts (lengths, full-block ids); documents drawn when first used
    sys_lengths, sys_blocks = [], []
    for _ in range(n_tenants):
        lengths = [_lognormal(rng, system_prompt_tokens, 0.5) for _ in range(n_system_prompts)]
        sys_lengths.append(lengths)
        sys_blocks.append([fresh(n // block_size) for n in lengths])
    weights = _zipf(n_system_prompts, zipf_s)
    doc_weights = _zipf(n_documents, doc_zipf_s)
    tenant_weights = _zipf(n_tenants, tenant_zipf_s)
    doc_lengths: dict[tuple[int, int], int] = {}
    doc_prefix: dict[tuple[int, int, int], tuple[list[int], int]] = {}  # (tenant, sp, doc) -> ids, len

    # (arrival s, session, seq, hash_ids, input_length, output_length, type, parent seq or -1, turn)
    turns: list[tuple] = []
    start = 0.0
    for session in range(n_sessions):
        start += rng.expovariate(session_rate)
        if mode == "mix":
            kind = "agent" if rng.random() < agent_fraction else "chat"
        elif mode == "blend":
            kind = rng.choices(KINDS, kind_weights)[0]
        else:
            kind = mode
        tenant = rng.choices(range(n_tenants), tenant_weights)[0] if n_tenants > 1 else 0
        sp = rng.choices(range(n_system_prompts), weights)[0]
        ids, length = list(sys_blocks[tenant][sp]), sys_lengths[tenant][sp]
        if kind == "doc":
            doc = rng.choices(range(n_documents), doc_weights)[0]
            if (tenant, doc) not in doc_lengths:
                doc_lengths[tenant, doc] = _lognormal(rng, doc_tokens, 0.5)
            key = (tenant, sp, doc)
            if key not in doc_prefix:  # system prompt + document, its full blocks shared
                total = length + doc_lengths[tenant, doc]
                doc_prefix[key] = (ids + fresh(total // block_size - len(ids)), total)
            ids, length = list(doc_prefix[key][0]), doc_prefix[key][1]
        agent = kind == "agent"
        first = _lognormal(rng, user_tokens)
        n_turns = _geometric(rng, agent_turns_mean if agent else turns_mean)
        # a stack of open branches: (ids, length, next append, arrival, turn, parent seq)
        open_ = [(ids, length, first, start, 1, -1)]
        budget = n_turns
        while open_ and budget > 0:
            ids, length, append, t, turn, parent = open_.pop()
            if length + append > max_context_tokens:
                continue
            budget -= 1
            length += append
            ids = ids + fresh(-(-length // block_size) - len(ids))
            out = _lognormal(rng, output_tokens)
            seq = len(turns)
            turns.append((t, session, seq, tuple(ids), length, out, kind, parent, turn))
            wait = rng.expovariate(1.0 / (tool_time if agent else think_time))
            nxt = t + (out * time_per_output_token + wait)
            branches = fanout if agent and fanout_prob > 0 and rng.random() < fanout_prob else 1
            for _ in range(branches):  # the next prompt: this answer plus a tool output or message
                more = out + _lognormal(rng, tool_output_tokens if agent else user_tokens)
                open_.append((ids, length, more, nxt, turn + 1, seq))
            if branches > 1:  # the side branches end after their own turn; one goes on
                side = open_[-branches:-1]
                del open_[-branches:-1]
                for b_ids, b_len, b_more, b_t, b_turn, b_parent in side:
                    if b_len + b_more > max_context_tokens:
                        continue
                    b_len += b_more
                    b_ids = b_ids + fresh(-(-b_len // block_size) - len(b_ids))
                    turns.append((b_t, session, len(turns), tuple(b_ids), b_len,
                                  _lognormal(rng, output_tokens), kind, b_parent, b_turn))

    turns.sort(key=lambda x: (x[0], x[1], x[2]))
    chat_ids = {seq: i for i, (_, _, seq, *_rest) in enumerate(turns)}
    requests = [
        Request(timestamp=t, hash_ids=ids, input_length=n_in, output_length=n_out,
                chat_id=chat_ids[seq], parent_chat_id=chat_ids.get(parent, -1),
                type=kind, turn=turn)
        for t, _s, seq, ids, n_in, n_out, kind, parent, turn in turns
    ]
    return Trace(requests=requests, block_size=block_size, format="synthetic",
                 source=f"synth:seed={seed},mode={mode},n_sessions={n_sessions}")
