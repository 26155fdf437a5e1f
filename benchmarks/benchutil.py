"""Shared helpers for the benchmark scripts: machine description, load, peaks, FLOP counting, timing.

Benchmarks run on shared machines, so every script prints the load average next to its numbers and
reports the best and the median of several repetitions (best = least disturbed by other processes).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_str() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"load {a:.2f}/{b:.2f}/{c:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"
    except OSError:
        return "load n/a"


def machine_line() -> str:
    flags = cpu_flags()
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs{mem}, ISA {isa or 'n/a'}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {load_str()}"
    )


def bf16_native() -> bool:
    """oneDNN has native bf16 kernels here (avx512_bf16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def matmul_peak_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """Best-of-`reps` GFLOP/s of one n³ torch.matmul: the practical dense peak of this machine right now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = min(timeit(lambda: torch.matmul(a, b), reps))
    return 2 * n**3 / best / 1e9


def conv1x1_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """The same n³ product as a channels_last 1x1 convolution, which runs on oneDNN rather than MKL's sgemm.

    On AMD CPUs MKL's sgemm does not use its AVX-512 kernels, so this is the higher of the two fp32 peaks.
    """
    import torch.nn.functional as F

    x = torch.randn(1, n, 32, n // 32).contiguous(memory_format=torch.channels_last)  # n "pixels"
    w = torch.randn(n, n, 1, 1)
    F.conv2d(x, w)
    best = min(timeit(lambda: F.conv2d(x, w), reps))
    return 2 * n**3 / best / 1e9


def model_flops(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """FLOPs of one call (FlopCounterMode counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn(x)
    return float(fc.get_total_flops())


def timeit(fn: Callable[[], object], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def rate_summary(rates: list[float]) -> str:
    return f"best {max(rates):.1f}, median {statistics.median(rates):.1f}"


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


def synthetic_prepared(root: Path, n_images: int, size: int = 128) -> Path:
    """A prepared dataset of about `n_images` generated car drawings (all splits), for runs without --data."""
    from carspotter.data.synth import make_synthetic

    classes = max(4, min(24, n_images // 8))
    per_class = max(3, -(-n_images // classes))
    make_synthetic(root, classes=classes, per_class=per_class, size=size, seed=0)
    return root
