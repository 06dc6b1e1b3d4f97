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


def separate_compile_cache_per_capability() -> str | None:
    """Give torch.compile's kernel cache a folder of its own per forced CPU capability; return it (None: untouched).

    inductor keys its cached C++ kernels by the hardware, not by ``ATEN_CPU_CAPABILITY``: kernels compiled by a
    default run are reused by a run forced to ``avx2`` on the same machine, where they compute garbage (an
    "index out of bounds" from the kernel, or a NaN loss). Nothing changes where the capability is not forced or
    the user chose a cache folder (``TORCHINDUCTOR_CACHE_DIR``)."""
    import getpass
    import tempfile

    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if not capability or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    folder = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}-{capability}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def matmul_kind() -> str:
    """A description for machine records (nothing decides from it; precision 'auto' measures): what may make bf16
    fast or slow here: 'cuda-bf16', 'cuda', 'cpu-amx-bf16', 'cpu-avx512-bf16' or 'cpu-avx2'."""
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


AUTO_BF16_MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much at the model's shapes for precision 'auto' to pick it
AUTO_MEASURE_MAX_ROWS = 4096  # more rows per matmul change the ratio little and only lengthen the measurement
PRECISION_CACHE_FILE = "precision_auto.json"


def cpu_model() -> str:
    """The CPU's model string (/proc/cpuinfo 'model name'), else platform.processor(), else 'unknown cpu'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def matmul_seconds(dtype_name: str, rows: int, hidden: int, intermediate: int, repeats: int = 3) -> float:
    """Seconds of one (rows x hidden) @ (hidden x hidden) and one (rows x hidden) @ (hidden x intermediate) matmul in
    ``dtype_name`` on the CPU: best of ``repeats`` after one warm-up call (repeats=0: the warm-up call's own time)."""
    import time

    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x = torch.randn(rows, hidden, dtype=dtype)
    square, wide = torch.randn(hidden, hidden, dtype=dtype), torch.randn(intermediate, hidden, dtype=dtype)

    def once() -> float:
        start = time.perf_counter()
        torch.nn.functional.linear(x, square)
        torch.nn.functional.linear(x, wide)
        return time.perf_counter() - start

    warm = once()
    return min((once() for _ in range(repeats)), default=warm)


def measure_bf16_speedup(rows: int, hidden: int, intermediate: int) -> float:
    """fp32 seconds over bf16 seconds for the model's matmuls (matmul_seconds). bf16 and fp32 are first compared on
    an eighth of the rows: where bf16 is far slower (an AVX2-only CPU, ~100x) the full bf16 measurement would take
    seconds, and the scouts' ratio already decides."""
    scout_rows = max(1, rows // 8)
    fp32_scout = matmul_seconds("fp32", scout_rows, hidden, intermediate, repeats=1)
    bf16_scout = matmul_seconds("bf16", scout_rows, hidden, intermediate, repeats=1)
    if bf16_scout > 3 * fp32_scout:
        return fp32_scout / bf16_scout
    return matmul_seconds("fp32", rows, hidden, intermediate) / matmul_seconds("bf16", rows, hidden, intermediate)


def _read_precision_cache(path) -> dict:
    """The cached measurements, or {} where the file is absent, unreadable or not what this module writes (it is
    then measured again and rewritten)."""
    import json

    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(cached, dict):
        return {}
    return {key: value for key, value in cached.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0}


def bf16_speedup(rows: int, hidden: int, intermediate: int) -> tuple[float, str]:
    """(fp32 time / bf16 time at these shapes, 'measured' | 'cached'): measured once per machine and kept in the
    peftkit cache, keyed by the CPU model, torch version, thread count and shapes."""
    import torch

    from peftkit.paths import cache_dir
    from peftkit.utils.atomic import atomic_write_json

    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {rows}x{hidden}x{intermediate}"
    path = cache_dir() / PRECISION_CACHE_FILE
    cached = _read_precision_cache(path)
    if key in cached:
        return float(cached[key]), "cached"
    ratio = measure_bf16_speedup(rows, hidden, intermediate)
    try:  # a cache that cannot be written costs only a measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**cached, key: ratio})
    except OSError:
        pass
    return ratio, "measured"


def resolve_precision(precision: str, shapes: tuple[int, int, int] | None = None) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for ``train.precision``. 'auto' on CUDA: bf16 where the device supports it. On a
    CPU it is measured, never read from feature flags: a bf16 and an fp32 matmul of the model's ``shapes``
    (rows = batch x sequence, hidden, intermediate) are timed once per machine (bf16_speedup) and bf16 is picked
    where it is at least AUTO_BF16_MIN_SPEEDUP times faster and this process's bf16 kernels run (cpu_bf16_failure).
    Measured ratios span ~8x (AMX) to ~0.01x (AVX2 only)."""
    if precision != "auto":
        return precision, "set by train.precision"
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(0)} supports bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name(0)} has no bf16"
    failure = cpu_bf16_failure()
    if failure:
        return "fp32", f"auto: this process's bf16 kernels fail ({failure})"
    rows, hidden, intermediate = shapes or (AUTO_MEASURE_MAX_ROWS, 768, 3072)
    rows = max(1, min(rows, AUTO_MEASURE_MAX_ROWS))
    ratio, source = bf16_speedup(rows, hidden, intermediate)
    figures = f"bf16 matmul {ratio:.3g}x fp32 at {rows}x{hidden}x{intermediate} on {cpu_model()}, {source}"
    if ratio >= AUTO_BF16_MIN_SPEEDUP:
        return "bf16", f"auto: {figures}"
    return "fp32", f"auto: {figures}; bf16 needs {AUTO_BF16_MIN_SPEEDUP}x"


def matmul_peak_flops(dtype_name: str = "fp32", size: int = 1024, repeats: int = 5, clock: str = "wall") -> float:
    """Measured FLOP/s of a size^2 matmul in ``dtype_name`` on the default device with the current threads: the
    machine limit a training step's model FLOP/s is compared with (MFU). ``clock='cpu'`` (CPU only) times by the
    process's CPU seconds: on a machine shared with other work, the wall clock also counts the time this process
    waited for a core, the CPU clock only what it computed (with one thread, FLOPs per CPU-second is the core's
    own speed)."""
    import time

    import torch

    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    now = time.process_time if clock == "cpu" and device == "cpu" else time.perf_counter
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = now()
        a @ b
        sync()
        best = min(best, now() - start)
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
