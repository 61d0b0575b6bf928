"""The processes of a `torchrun` launch: joining its process group, wrapping the objective in DDP
or FSDP2 (`fully_shard`), and gathering FSDP's sharded parameters to read them."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    from torch import Tensor, nn

log = logging.getLogger(__name__)

# the FSDP device meshes this process made: each holds the process group (`stop_processes`)
_MESHES: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True)
class Processes:
    """This process's place in a `torchrun` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    strategy: str = "none"

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> float:
        """The mean of a scalar over all ranks."""
        if self.world == 1:
            return float(value)
        import torch.distributed as dist

        value = value.detach().clone().float().to(self.device)
        dist.all_reduce(value)
        return float(value) / self.world

    def means(self, values: Tensor) -> list[float]:
        """The mean over all ranks of each element of a vector, read to the host at once."""
        values = values.detach().float()
        if self.world > 1:
            import torch.distributed as dist

            values = values.clone().to(self.device)
            dist.all_reduce(values)
            values = values / self.world
        return values.tolist()


def start_processes(device: str, strategy: str) -> Processes:
    """Join the process group `torchrun` set up (nccl on CUDA, gloo on CPU), or run alone.
    `device` is resolved (`settings.resolve_device`): under torchrun, `cuda` is the local rank's."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world == 1:  # one process: nothing to replicate or shard
        if strategy in ("ddp", "fsdp"):
            log.warning(
                "--strategy %s needs torchrun with several processes; running alone", strategy
            )
        if device.startswith("cuda:"):  # the RNG states saved and restored are this GPU's
            torch.cuda.set_device(device)
        return Processes(device=device)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _import_what_the_run_uses()
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Processes(rank, world, device, strategy)


def _import_what_the_run_uses() -> None:
    """The torch.distributed modules a run reaches (FSDP, the checkpoint's state dicts), imported
    before the process group exists. They import `torch.distributed.nn.functional`, whose
    collectives take `group=group.WORLD` as a default argument: imported once the group exists,
    that default holds the group for good, `destroy_process_group` cannot free it, and gloo's
    worker threads run on into interpreter shutdown, where one releasing a finished collective's
    tensors takes the GIL and aborts the process ("terminate called without an active
    exception", on whichever rank left first)."""
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401


def stop_processes() -> None:
    """Leave a `torchrun` launch: every rank waits for the others (none tears its group down
    while another still runs collectives: the leader may still be writing the last checkpoint),
    then the group is destroyed and freed, so that gloo's worker threads are joined here, while
    the interpreter is alive, not at its shutdown (see `_import_what_the_run_uses`). Besides
    `torch.distributed`'s own tables, FSDP's device meshes hold the group (`_pg_registry`, for
    torch.compile), and DTensor's sharding caches keep those meshes alive; FSDP's modules hold it
    in reference cycles. Call it once, after the last `train` of the process."""
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    for mesh in list(_MESHES):
        getattr(mesh, "_pg_registry", {}).clear()
    gc.collect()


def wrap(objective: nn.Module, processes: Processes) -> nn.Module:
    """DDP or FSDP2 around the objective. FSDP shards each transformer block as its own unit when
    nothing outside a block's forward reads its weights (training terms and fractal views do),
    else the whole model as one unit (ZeRO-3 over one group)."""
    if processes.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [processes.device] if processes.device.startswith("cuda") else None
        unused = objective.model.federation.leaves_parameters_unused
        return DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=unused)
    if processes.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from runtime.transformer import Block, Transformer

        # fully_shard's default mesh is on CUDA whenever a GPU is visible, even for a CPU run
        kind = "cuda" if processes.device.startswith("cuda") else "cpu"
        mesh = init_device_mesh(kind, (processes.world,))
        _MESHES.add(mesh)
        model = objective.model
        blocks_alone = not objective.fractals and not any(
            hasattr(m, "regularisation") for m in model.modules()
        )
        if blocks_alone:
            for module in model.modules():
                if type(module) is Transformer:
                    for block in module.blocks:
                        if isinstance(block, Block):
                            fully_shard(block, mesh=mesh)
        fully_shard(objective, mesh=mesh)
        return objective
    return objective


@contextlib.contextmanager
def gathered(root: nn.Module, processes: Processes) -> Iterator[None]:
    """Full parameters in place for reading outside a forward (FSDP keeps them sharded)."""
    if processes.strategy != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
