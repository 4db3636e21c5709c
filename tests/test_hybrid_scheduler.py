"""Mamba + attention through vLLM's real Scheduler (KVCacheManager, MambaManager in "align" mode)
and the kvbm connector, with no model: vLLM 0.32's CPU build runs a tiny NemotronH only with
mamba_cache_mode "none" (with "align", vLLM's own Mamba prefix caching, its mamba_mixer2 fails
on CPU with an IndexError in conv_ssm_forward, kvbm or not), and kvbm needs "align": the
states at block boundaries are what it stores. So the engine's steps are played here: the
real scheduler allocates and schedules, the worker half moves real tensors.
"""

import json
import os

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")
torch = pytest.importorskip("torch")

from kvbm.config import ConfigError  # noqa: E402
from kvbm.connectors import core  # noqa: E402
from kvbm.connectors.manifest import state_key  # noqa: E402
from kvbm.connectors.vllm import KVBMConnector  # noqa: E402
from kvbm.connectors.vllm_hma import manifest_from_vllm  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, MambaSpec  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

BS, NBLOCKS = 128, 64
NEMOTRON_H = {  # a tiny hybrid: Mamba2 (M), MLP (-), attention (*)
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 4, "hybrid_override_pattern": "M-*-",
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "mamba_num_heads": 8,
    "mamba_head_dim": 32, "ssm_state_size": 16, "n_groups": 1, "conv_kernel": 4, "expand": 1,
    "chunk_size": 64, "use_conv_bias": True, "use_bias": False, "mlp_bias": False, "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu", "layer_norm_epsilon": 1e-5, "rms_norm_eps": 1e-5, "vocab_size": 1024,
    "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
STATE = MambaSpec(block_size=BS, shapes=((3, 32), (2, 8, 4)), dtypes=(torch.bfloat16, torch.float32),
                  mamba_cache_mode="align")
ATTN = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)


@pytest.fixture
def engine(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(NEMOTRON_H))
    kvbm = {"tiers": [{"name": "g2", "capacity": 32, "storage": {"name": "host", "pin": "never"}}]}
    args = EngineArgs(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      block_size=BS, enforce_eager=True, max_model_len=4096, enable_prefix_caching=True,
                      mamba_cache_mode="align",
                      kv_transfer_config={"kv_connector": "KVBMConnector", "kv_connector_module_path": "kvbm.connectors.vllm",
                                          "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                          "kv_connector_extra_config": {"kvbm_config": kvbm}})
    vc = args.create_engine_config()
    assert vc.scheduler_config.disable_hybrid_kv_cache_manager is False  # kvbm supports HMA: vLLM keeps it
    vc.cache_config.num_gpu_blocks = NBLOCKS
    kc = KVCacheConfig(num_blocks=NBLOCKS, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["m0"], STATE), KVCacheGroupSpec(["a2"], ATTN)])
    sched = Scheduler(vc, kc, StructuredOutputManager(vc), block_size=BS)
    worker = KVBMConnector(vc, KVConnectorRole.WORKER, kc)
    g = torch.Generator().manual_seed(0)
    kv = {"m0": [torch.randn(NBLOCKS, 3, 32, generator=g).to(torch.bfloat16), torch.randn(NBLOCKS, 2, 8, 4, generator=g)],
          "a2": torch.randn(NBLOCKS, 2, BS, 128, generator=g).to(torch.bfloat16)}
    worker.register_kv_caches(kv)
    yield sched, worker, kv
    core.release_managers()


def run_worker(worker, meta):
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker._finish_loads(wait=True)
    results = worker.get_transfer_results(set())
    worker.clear_connector_metadata()
    return results


def test_mamba_state_round_trips_through_vllms_scheduler(engine):
    sched, worker, kv = engine
    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)
    hasher = get_request_block_hasher(BS, fn)
    toks = [(i * 104729) % 1000 + 3 for i in range(3 * BS + 5)]
    a = Request("a", toks, SamplingParams(max_tokens=4), None, block_hasher=hasher)
    sched.add_request(a)
    out = sched.schedule()
    # align mode: the first step ends on a block boundary (384 tokens) and keeps the state
    # there, in the Mamba group's block at index 2; kvbm stores 3 pages and page 2 with it
    assert out.num_scheduled_tokens == {"a": 3 * BS}
    mamba_ids, attn_ids = out.scheduled_new_reqs[0].block_ids
    assert mamba_ids[:2] == [0, 0] and mamba_ids[2] != 0
    stores = out.kv_connector_metadata.stores
    assert [(len(p.keys), p.block_ids) for p in stores] == [
        (3, [(None, attn_ids[0]), (None, attn_ids[1]), (None, attn_ids[2])]), (1, [(mamba_ids[2], attn_ids[2])])]
    assert stores[1].keys == [state_key(stores[0].keys[2])]
    run_worker(worker, out.kv_connector_metadata)
    state = [t[mamba_ids[2]].clone() for t in kv["m0"]]
    pages = [kv["a2"][b].clone() for b in attn_ids]

    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.reset_prefix_cache()  # vLLM's own prefix cache forgets A: only kvbm has it
    b = Request("b", toks, SamplingParams(max_tokens=4), None, block_hasher=hasher)
    sched.add_request(b)
    out = sched.schedule()
    assert b.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    (plan,) = out.kv_connector_metadata.loads
    mamba_b, attn_b = sched.kv_cache_manager.get_block_ids("b")
    # vLLM put B's state block where a 384-token hit ends (index 2): kvbm's state lands there
    assert mamba_b[2] != 0 and plan.block_ids == [(None, attn_b[0]), (None, attn_b[1]), (mamba_b[2], attn_b[2])]
    results = run_worker(worker, out.kv_connector_metadata)
    assert results.finished_recving == {"b"} and not results.failed_recving
    assert all(torch.equal(t[mamba_b[2]], s) for t, s in zip(kv["m0"], state))
    assert all(torch.equal(kv["a2"][x], p) for x, p in zip(attn_b, pages))


def test_mamba_without_align_mode_is_refused():
    none = MambaSpec(block_size=BS, shapes=STATE.shapes, dtypes=STATE.dtypes, mamba_cache_mode="none")
    kc = KVCacheConfig(num_blocks=NBLOCKS, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["m0"], none), KVCacheGroupSpec(["a2"], ATTN)])
    with pytest.raises(ConfigError, match="mamba_cache_mode 'align'"):
        manifest_from_vllm(kc)
