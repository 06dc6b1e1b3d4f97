"""Process-group setup for `torchrun`: nccl with one GPU per process, else gloo on the CPU; a no-op for one process.

With fewer GPUs than local processes (e.g. `torchrun --nproc_per_node=2` on a one-GPU machine) the processes cannot
each own a device (NCCL refuses to share one), so every process of the group trains on the CPU with gloo instead
of failing with "invalid device ordinal"; a line says so."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    use_cuda: bool = True  # False when the group runs on the CPU although CUDA exists (too few GPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if torch.cuda.is_available() and not use_cuda and local == 0:
        print(f"[peftkit] {local_world} processes per node but {torch.cuda.device_count()} GPU(s): training on the CPU "
              "with gloo (one GPU per process is needed for CUDA)", flush=True)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, use_cuda=use_cuda)


def shutdown(info: DistInfo) -> None:
    """Leave the process group cleanly (every process, after its last collective): without it gloo's threads can
    abort the interpreter at exit."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def default_device(info: DistInfo):
    import torch

    if torch.cuda.is_available() and info.use_cuda:
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device("cpu")


def shard_model(model) -> None:
    """FSDP2: shard every transformer block, then the rest of the model, across the process group (gloo on CPU,
    NCCL on GPUs). Parameters become DTensors; each process holds 1/world of them between uses."""
    from torch.distributed.fsdp import fully_shard

    from peftkit.models.families import layers_of

    for layer in layers_of(model):
        fully_shard(layer)
    fully_shard(model)


def full_tensors(state: dict) -> dict:
    """A state dict with every sharded tensor gathered whole (a collective: every process calls it, same order)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
