"""The TensorRT-LLM connector's engine-independent halves: plain Python, tested without tensorrt_llm.

    token_hashes(tokens, block_size, parent)   chained hashes of a request's full token blocks
    request_identity(request) -> (salt, keyable)   a request's cache salt, and whether it may be keyed
    retention_hints(retention, prompt_len, block_size, num_blocks)   KvCacheRetentionConfig -> Hints
    layout_from_hf(model_dir, block_size, dtype, tp_size)   KVLayout of one block from config.json
    TrtllmMetadata                             what the scheduler half hands the workers per step
    TrtllmPlanner                              the scheduler half: match, load plans, store plans
    TrtllmTransfers                            the worker half: runs the plans on the KV pool

kvbm.connectors.trtllm (the adapters that need tensorrt_llm) re-exports every name here.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..blocks import KVLayout, Namespace
from ..manager import BlockManager
from ..policies.base import DEFAULT_PRIORITY, Hints
from ..policies.priority import block_priorities
from .core import LoadPlan, SchedulerSide, StorePlan, WorkerSide

_TOKENS = Namespace("kvbm-trtllm-tokens")  # roots the token chain; salts are mixed in on adoption


# ---------------------------------------------------------------- plain functions


def token_hashes(tokens: Sequence[int], block_size: int, parent: bytes | None = None) -> list[bytes]:
    """Chained hashes of each full block of `tokens` (after `parent`, the previous block's hash)."""
    return _TOKENS.chain(list(tokens), block_size, parent=parent)


def _field(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:  # pybind properties or plain attributes, across TRT-LLM versions
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    return default


def request_identity(request: Any) -> tuple[str, bool]:
    """(salt, keyable) of a TensorRT-LLM request: what besides its tokens shapes its KV.

    The cache salt, the LoRA adapter (`lora_task_id`) and the images (`multimodal_hashes`,
    with their positions) all go into the salt, so two requests share blocks only when all
    agree. A request with multimodal input but no hashes for it cannot be keyed: not keyable.
    """
    parts = [str(_field(request, "cache_salt") or "")]
    if any(ord(c) < 0x20 for c in parts[0]):  # NUL joins the parts below: this salt could pose as another's
        return "", False
    lora = _field(request, "lora_task_id")
    if lora is not None:
        parts.append(f"lora={lora}")
    mm = _field(request, "multimodal_hashes")
    if mm:
        parts.append("mm=" + repr([list(h) for h in mm]))
        pos = _field(request, "multimodal_positions")
        if pos:
            parts.append("mmpos=" + repr(list(pos)))
    elif any(_field(request, name) for name in ("py_multimodal_data", "multimodal_embedding",
                                                 "mrope_rotary_cos_sin", "multimodal_lengths")):
        return "", False
    return "\0".join(parts) if len(parts) > 1 else parts[0], True


def _seconds(duration: Any) -> float | None:
    if duration is None:
        return None
    return duration.total_seconds() if hasattr(duration, "total_seconds") else float(duration)


def retention_hints(retention: Any, prompt_len: int, block_size: int, num_blocks: int) -> list[Hints] | None:
    """Per-block Hints from a TensorRT-LLM KvCacheRetentionConfig (None: all default).

    Prompt blocks take the token range holding their first token (TensorRT-LLM's rule);
    blocks that start at or after `prompt_len` are decode blocks and take
    decode_retention_priority / decode_duration_ms. Durations become seconds.
    """
    if retention is None:
        return None
    ranges = _field(retention, "token_range_retention_configs", default=None) or []
    n_prompt = min(num_blocks, -(-prompt_len // block_size))  # blocks holding a prompt token
    hints = block_priorities(ranges, block_size, n_prompt)
    decode = _field(retention, "decode_retention_priority", default=DEFAULT_PRIORITY)
    decode_s = _seconds(_field(retention, "decode_duration_ms", default=None))
    for i in range(n_prompt, num_blocks):
        hints.append(Hints(decode, decode_s if decode != DEFAULT_PRIORITY else None, position=i))
    return hints


def layout_from_hf(model_dir: str, block_size: int, dtype: str | None = None, tp_size: int = 1) -> KVLayout:
    """The KVLayout of one TensorRT-LLM block (all layers) from the model's HF config.json."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    dtype = dtype if dtype not in (None, "auto") else str(cfg.get("torch_dtype", "bfloat16"))
    return KVLayout(num_layers=cfg["num_hidden_layers"], num_kv_heads=max(1, kv_heads // tp_size),
                    head_dim=head_dim, block_size=block_size, dtype=dtype.removeprefix("torch."),
                    tp_size=tp_size)


# ---------------------------------------------------------------- scheduler half


@dataclass
class TrtllmMetadata:
    """One step's plans, scheduler -> workers (picklable: TRT-LLM broadcasts it over MPI)."""

    loads: list[LoadPlan] = field(default_factory=list)
    stores: list[StorePlan] = field(default_factory=list)


@dataclass
class _Seq:
    tokens: list = field(default_factory=list)
    hashes: list = field(default_factory=list)
    block_ids: list = field(default_factory=list)
    prompt_len: int = 0
    retention: Any = None
    priorities: list | None = None  # RequestData.priorities (ints, no durations), newer TRT-LLM
    matched: int = 0  # tokens the last match promised, loaded once the blocks are allocated
    salt: str | None = None  # cache salt + LoRA + multimodal identity, fixed by match(); None: never matched
    keyable: bool = True  # False: inputs beyond the tokens that kvbm cannot key (neither matched nor stored)


class TrtllmPlanner:
    """Scheduler-half logic over TensorRT-LLM's plain data (tokens, block ids, positions).

    match()    get_num_new_matched_tokens: whole ready blocks beyond the device hit, leaving
               the engine at least one prompt token to compute
    step()     build_connector_meta: RequestData of new and cached requests -> load and store
               plans; stores carry per-block Hints from the request's retention config
    finished() request_finished
    """

    def __init__(self, manager: BlockManager, lock: threading.RLock, namespace: Namespace,
                 block_size: int, shards: int = 1) -> None:
        self.side = SchedulerSide(manager, lock, namespace, block_size, shards=shards)
        self.block_size = block_size
        self._seqs: dict[Any, _Seq] = {}

    @property
    def manager(self) -> BlockManager:
        return self.side.manager

    def _sync_keys(self, req_id: Any, seq: _Seq, salt: str | None = None) -> list:
        full = len(seq.tokens) // self.block_size
        if full > len(seq.hashes):
            start = len(seq.hashes) * self.block_size
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes += token_hashes(seq.tokens[start:full * self.block_size], self.block_size, parent)
        return self.side.keys(req_id, seq.hashes, salt)

    def match(self, req_id: Any, tokens: Sequence[int], num_computed: int, salt: str | None = None,
              retention: Any = None, keyable: bool = True) -> int:
        """Tokens beyond the device's `num_computed` that kvbm supplies (whole blocks).

        `salt` must name everything besides the tokens that shapes the KV (cache salt, LoRA
        adapter, images): it keys this request's stores too. keyable=False: the request has
        such inputs and no identity for them; kvbm neither serves nor stores its blocks."""
        seq = self._seqs.setdefault(req_id, _Seq())
        seq.tokens = list(tokens)
        seq.prompt_len = len(seq.tokens)
        seq.retention = retention
        seq.salt, seq.keyable = salt or "", keyable
        if not keyable:
            return 0
        keys = self._sync_keys(req_id, seq, seq.salt)
        n = self.side.match(req_id, keys, len(seq.tokens), num_computed, must_compute_one=True)
        seq.matched = n
        return n

    def step(self, new: Sequence[Any], cached: Sequence[Any]) -> TrtllmMetadata:
        """Plans for one forward pass from TRT-LLM's RequestData lists."""
        for data in new:
            seq = self._seqs.setdefault(data.request_id, _Seq())
            seq.block_ids = list(data.new_block_ids)
            if seq.salt is None or not seq.keyable:
                # never matched (its LoRA / image identity unknown) or not keyable: a store
                # under its plain token keys could be served to a request it does not match
                continue
            if len(data.new_tokens) >= len(seq.tokens):
                seq.tokens = list(data.new_tokens)
                seq.prompt_len = seq.prompt_len or len(seq.tokens)
            self._take_priorities(seq, data, reset=True)
            keys = self._sync_keys(data.request_id, seq, seq.salt)
            if seq.matched:
                self.side.plan_load(data.request_id, seq.block_ids, seq.matched)
                seq.matched = 0
            self._plan_store(data, seq, keys)
        for data in cached:
            seq = self._seqs.get(data.request_id)
            if seq is None or seq.salt is None or not seq.keyable:
                continue
            seq.block_ids += list(data.new_block_ids)
            seq.tokens += list(data.new_tokens)
            self._take_priorities(seq, data, reset=False)
            self._plan_store(data, seq, self._sync_keys(data.request_id, seq))
        loads, stores = self.side.take_plans()
        return TrtllmMetadata(loads, stores)

    def _take_priorities(self, seq: _Seq, data: Any, reset: bool) -> None:
        prios = _field(data, "priorities")
        if prios is None:
            return
        seq.priorities = list(prios) if reset or seq.priorities is None else seq.priorities + list(prios)

    def _hints(self, seq: _Seq, n_blocks: int) -> list[Hints] | None:
        if seq.retention is not None:  # ranges and durations: the full retention config
            return retention_hints(seq.retention, seq.prompt_len, self.block_size, n_blocks)
        if seq.priorities is not None and len(seq.priorities) >= n_blocks:
            return [Hints(int(p), position=i) for i, p in enumerate(seq.priorities[:n_blocks])]
        return None

    def _plan_store(self, data: Any, seq: _Seq, keys: list) -> None:
        # Newer TRT-LLM leaves the connector's tokens out of computed_position, so `done` may
        # fall short by the loaded blocks for one step: a block is stored a step late, never early.
        done = data.computed_position + data.num_scheduled_tokens
        self.side.set_priorities(data.request_id, self._hints(seq, len(keys)))
        self.side.plan_store(data.request_id, seq.block_ids, done)

    def finished(self, req_id: Any) -> bool:
        """Forget the request; True if any of its blocks were planned for store (the engine
        must then hold them until the worker reports the writes done)."""
        self._seqs.pop(req_id, None)
        return self.side.finished(req_id) > 0


# ---------------------------------------------------------------- worker half


class TrtllmTransfers:
    """Worker-half logic: sync loads, async stores, completion per request."""

    def __init__(self, manager: BlockManager, lock: threading.RLock, async_save: bool = True,
                 rank: int = 0) -> None:
        # async_save: on a GPU, gather with kvbm's copy kernel behind the forward's stream;
        # finished requests already hold their blocks until the writes land (request_finished)
        # rank: this worker's shard of each block (tensor x pipeline parallel), keyed apart
        self.worker = WorkerSide(manager, lock, async_save=async_save, rank=rank)
        self._saving: set = set()  # finished requests whose writes may still run

    def register(self, kv_cache_tensor: Any) -> None:
        self.worker.register([kv_cache_tensor], block_dim=0)

    def load(self, meta: TrtllmMetadata) -> dict[Any, list[int]]:
        """Run the step's loads to completion; {req_id: block ids that did not arrive intact}."""
        for plan in meta.loads:
            self.worker.start_load(plan)
        if not meta.loads:
            return {}
        loads, _ = self.worker.poll(wait=True)
        return {r: ids for r, ids in loads.items() if ids}

    def save(self, meta: TrtllmMetadata, stream: Any = None) -> None:
        """Gather the step's full blocks after the work on `stream` (the forward's)."""
        for plan in meta.stores:
            self.worker.start_store(plan, after=stream)

    @property
    def direct(self) -> bool:
        """True when saves are GPU copy kernels ordered by streams (no host synchronize needed)."""
        return self.worker.async_save and self.worker.kv is not None and self.worker.kv.direct

    def finished(self, finished_gen_req_ids: Sequence[Any]) -> list:
        """The finished requests whose stores have all landed (their blocks may be freed)."""
        self._saving.update(finished_gen_req_ids)
        self.worker.poll()
        busy = self.worker.saving()
        done = [r for r in self._saving if r not in busy]
        self._saving.difference_update(done)
        return done
