"""Facts about this process for bug reports and env.json: versions, device, threads."""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def matmul_kind() -> str:
    """What makes bf16 fast or slow here: 'cuda-bf16', 'cuda', 'cpu-amx-bf16', 'cpu-avx512-bf16' or 'cpu-avx2'."""
    import torch

    if torch.cuda.is_available():
        return "cuda-bf16" if torch.cuda.is_bf16_supported() else "cuda"
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "cpu-amx-bf16"
    if "avx512_bf16" in flags:
        return "cpu-avx512-bf16"
    return "cpu-avx2" if "avx2" in flags else "cpu"


@functools.lru_cache(maxsize=None)
def cpu_bf16_failure() -> str | None:
    """Why this process's CPU kernels cannot train in bf16, or None where they can. Tried, not read from flags:
    torch picks its bf16 kernels by what the hardware reports (AMX, VNNI packing) but compiles them for the
    dispatched capability, so with ``ATEN_CPU_CAPABILITY=avx2`` on an AMX machine a bf16 attention of real sizes
    raises ("pack_vnni2 is only supported when avx512 is supported") while small shapes still run. One attention
    forward and backward at a shape that takes the blocked path (64 tokens, head size 32) and one matmul: a few ms."""
    import torch

    try:
        q = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        w = torch.randn(64, 64, dtype=torch.bfloat16)
        torch.nn.functional.linear(w, w)
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


def bf16_or_fp32_dtype_name() -> str:
    """'bfloat16' where bf16 kernels run on this device, else 'float32' (see cpu_bf16_failure)."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32" if cpu_bf16_failure() else "bfloat16"


def resolve_precision(precision: str) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for ``train.precision``. 'auto' picks bf16 only where it is fast: a CUDA device with
    bf16, or a CPU with AMX tiles (a 1024^2 bf16 matmul ~10x fp32 there), and only where this process's bf16
    kernels actually run (cpu_bf16_failure); elsewhere fp32 (bf16 matmuls are ~100x slower on AVX2-only CPUs)."""
    if precision != "auto":
        return precision, "set by train.precision"
    kind = matmul_kind()
    if kind == "cuda-bf16":
        return "bf16", f"auto: {kind} runs bf16 matmuls fast"
    if kind == "cpu-amx-bf16":
        failure = cpu_bf16_failure()
        if failure:
            return "fp32", f"auto: {kind}, but this process's bf16 kernels fail ({failure})"
        return "bf16", f"auto: {kind} runs bf16 matmuls fast"
    return "fp32", f"auto: {kind} has no fast bf16 matmul"


def matmul_peak_flops(dtype_name: str = "fp32", size: int = 1024, repeats: int = 5) -> float:
    """Measured FLOP/s of a size^2 matmul in ``dtype_name`` on the default device with the current threads: the
    machine limit a training step's model FLOP/s is compared with (MFU)."""
    import time

    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def environment() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "matmul_kind": matmul_kind(),
    }
    for pkg in ("peftkit", "torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "safetensors", "tokenizers"):
        info[pkg] = package_version(pkg)
    return info
