"""The synthetic workload family: each knob does what its docstring says."""

import pytest

from kvbm.sim import synth


def _first_blocks(trace, kind):
    return [r.hash_ids for r in trace.requests if r.type == kind and r.turn == 1]


def test_doc_sessions_share_the_document_blocks_of_a_popular_document():
    trace = synth.generate(n_sessions=60, seed=1, mode="doc", n_documents=3, doc_tokens=4000, n_system_prompts=1)
    firsts = _first_blocks(trace, "doc")
    # one system prompt, three documents: many sessions open with the same 7+ blocks
    heads = [ids[:7] for ids in firsts]
    assert max(heads.count(h) for h in heads) >= 10
    assert all(len(ids) >= 6 for ids in firsts)


def test_fanout_branches_extend_the_same_parent_turn():
    trace = synth.generate(n_sessions=10, seed=2, mode="agent", fanout_prob=0.5, fanout=3)
    by_parent = {}
    for r in trace.requests:
        by_parent.setdefault(r.parent_chat_id, []).append(r)
    by_id = {r.chat_id: r for r in trace.requests}
    fans = [kids for p, kids in by_parent.items() if p != -1 and len(kids) >= 2]
    assert fans, "some turn fanned out"
    for kids in fans:
        parent = by_id[kids[0].parent_chat_id]
        for k in kids:  # each branch's prompt extends its parent's
            assert k.hash_ids[: len(parent.hash_ids)] == parent.hash_ids and k.turn == parent.turn + 1


def test_tenants_never_share_a_block():
    trace = synth.generate(n_sessions=80, seed=3, mode="chat", n_tenants=3, n_system_prompts=2)
    firsts = {ids[0] for ids in _first_blocks(trace, "chat")}
    assert 3 < len(firsts) <= 6  # 3 tenants x 2 system prompts, no id shared across tenants


def test_blend_draws_every_kind_and_old_modes_are_unchanged():
    trace = synth.generate(n_sessions=60, seed=4, mode="blend", kind_weights=(1, 1, 1))
    assert {r.type for r in trace.requests} == {"chat", "agent", "doc"}
    # knobs at their defaults draw no random numbers: a chat trace is what it was before them
    assert synth.generate(n_sessions=30, seed=5).requests == synth.generate(n_sessions=30, seed=5, n_tenants=1).requests


def test_named_workloads_and_bad_knobs():
    assert set(synth.WORKLOADS) >= {"chat", "agent", "docqa", "fanout", "tenants", "rag", "long-agent"}
    assert synth.workload("rag", seed=1).requests != synth.workload("rag").requests
    with pytest.raises(ValueError, match="unknown workload"):
        synth.workload("nope")
    with pytest.raises(ValueError, match="kind_weights"):
        synth.generate(mode="blend")
    with pytest.raises(ValueError, match="fanout"):
        synth.generate(fanout_prob=2.0)
