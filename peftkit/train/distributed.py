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


def fsdp_policies(options) -> dict:
    """fully_shard's keyword arguments for ``train.fsdp_mixed_precision`` and ``train.fsdp_cpu_offload``:
    MixedPrecisionPolicy (bf16: parameters gathered and computed in bfloat16, gradients reduced in float32; the
    sharded master copy the optimizer updates stays float32) and CPUOffloadPolicy (sharded parameters, gradients
    and optimizer state live on the CPU between uses; pinned memory only where CUDA exists)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs = {}
    if getattr(options, "fsdp_mixed_precision", "none") == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if getattr(options, "fsdp_cpu_offload", False):
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return kwargs


def shard_model(model, method=None, options=None) -> None:
    """FSDP2: shard the model across the process group (gloo on CPU, NCCL on GPUs). Parameters become DTensors;
    each process holds 1/world of them between uses (frozen ones too: a frozen base is sharded like a trained one).

    The units, innermost first: the modules the method names (``Method.fsdp_units``, e.g. a quantized base's packed
    Linears, gathered without a mixed-precision cast), then every transformer block (unless the method's
    ``fsdp_blocks`` is False: MEFT's reversible stack calls pieces of a block, never the block, so a block's hooks
    would not gather it), then the rest of the model. A unit is gathered before its forward and again before its
    backward; the root unit stays gathered from its forward to the end of backward."""
    from torch.distributed.fsdp import fully_shard

    policies = fsdp_policies(options)
    plain = {k: v for k, v in policies.items() if k != "mp_policy"}
    for unit in (method.fsdp_units(model) if method is not None else []):
        fully_shard(unit, **plain)
    if method is None or method.fsdp_blocks:
        for block in blocks_of(model):
            fully_shard(block, **policies)
    fully_shard(model, **policies)


def blocks_of(model) -> list:
    """The transformer blocks to shard one by one: the family's layer list (inside a peft wrapper too), else, for a
    model no family describes (the pretraining models of peftkit/pretrain, which hold their encoder inside), the
    elements of every outermost plain ModuleList."""
    from torch import nn

    from peftkit.models.families import layers_of

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return list(layers_of(inner))
    except (ValueError, AttributeError, KeyError):  # no family, or not at its path: look at the structure instead
        pass
    found, inside = [], set()
    for name, module in model.named_modules():
        if type(module) is nn.ModuleList and not any(name.startswith(prefix) for prefix in inside):
            found += list(module)
            inside.add(name + ".")
    return found


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(state: dict) -> dict:
    """A state dict with every sharded tensor gathered whole (a collective: every process calls it, same order)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def load_method_state(method, model, tensors: dict, device) -> None:
    """Put whole tensors (a checkpoint's method state) into a sharded model: each tensor whose counterpart in the
    method's current state is a DTensor is cut into this process's shard first, then the method loads them as it
    would load plain ones (its own key names, its own checks), so a method's state needs no FSDP-specific loader."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor

    # After a forward without backward (an evaluation) the root unit stays gathered, and what is written into a
    # gathered parameter is dropped at the next reshard: load into the shards, which outlive it.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    current = method.trainable_state(model)
    placed = {}
    for key, value in tensors.items():
        ours = current.get(key)
        if isinstance(ours, DTensor):
            placed[key] = distribute_tensor(value.to(device=ours.device, dtype=ours.dtype), ours.device_mesh,
                                            ours.placements)
        else:
            placed[key] = value.to(device)
    method.load_trainable_state(model, placed)


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load an optimizer state whose moments were saved whole: each is cut like the parameter it belongs to."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in state["state"].items():
        param = params[int(index)]
        state["state"][index] = {
            k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements)
            if isinstance(param, DTensor) and torch.is_tensor(v) and v.shape == param.shape else v
            for k, v in moments.items()}
    optimizer.load_state_dict(state)


def local_bytes(model) -> tuple[int, int]:
    """(bytes of parameters and buffers this process holds, bytes of the whole model): with FSDP about 1/world of
    the parameters plus every buffer (buffers are replicated)."""
    from torch.distributed.tensor import DTensor

    held = whole = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        size = tensor.element_size()
        whole += tensor.numel() * size
        held += (tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()) * size
    return held, whole
