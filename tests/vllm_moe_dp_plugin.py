"""A test-only vLLM plugin: the two collectives vLLM 0.32's CPU communicator lacks for MoE with DP > 1.

vLLM runs a MoE model's layers across data parallel ranks through AllGather + ReduceScatter
(AgRsAll2AllManager, the only all2all manager of the CPU build), which calls all_gatherv and
reduce_scatterv; CpuCommunicator inherits both from DeviceCommunicatorBase, where they raise
NotImplementedError. So on CPU no MoE model can serve a request with DP > 1, and external data
parallelism (ranks launched one by one) is for MoE models only. install(folder) writes this
module and an entry point (group vllm.general_plugins, which vLLM loads in every process) into
`folder`; a server with `folder` on its PYTHONPATH gets both collectives over gloo on the
communicator's CPU group. Nothing else in vLLM changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

NAME = "kvbm_test_moe_dp"


def install(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, folder / f"{NAME}.py")
    info = folder / f"{NAME}-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {NAME}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{NAME} = {NAME}:register\n")
    return folder


def register() -> None:
    import torch
    import torch.distributed as dist
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    if getattr(CpuCommunicator, "_kvbm_test_gatherv", False):
        return

    def all_gatherv(self, input_, dim=0, sizes=None):
        if isinstance(input_, list):
            return [all_gatherv(self, t, dim, sizes) for t in input_]
        assert dim == 0, dim
        n, world = input_.shape[0], self.world_size
        sizes = list(sizes) if sizes is not None else [n] * world
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[:n] = input_
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.cpu_group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def reduce_scatterv(self, input_, dim=-1, sizes=None):
        assert dim == 0, dim
        world, rank = self.world_size, self.rank_in_group
        sizes = list(sizes) if sizes is not None else [input_.shape[0] // world] * world
        total = input_.float().contiguous()
        dist.all_reduce(total, group=self.cpu_group)
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]].to(input_.dtype).contiguous()

    CpuCommunicator.all_gatherv = all_gatherv
    CpuCommunicator.reduce_scatterv = reduce_scatterv
    CpuCommunicator._kvbm_test_gatherv = True
