"""What machine a run's wall times come from: processor, threads, vector extensions and a measured matmul rate.

Wall times say little across machines (the same demo takes twice as long on a 2-core AVX2 CPU as on a 2-core
AVX-512 one); the fp32 matrix-product rate measured next to them lets a reader scale them, and the benchmarks
compare their runs against it (``benchmarks/bench_generation.py``).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what :func:`platform.processor` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(m: int = 1024, k: int = 1024, n: int = 1024, seconds: float = 1.0, device: str = "cpu") -> float:
    """fp32 GFLOP/s of ``(m,k) @ (k,n)`` on ``device``, measured for about ``seconds``."""
    import torch

    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return 2.0 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def machine_info(seconds: float = 1.0) -> dict:
    """Processor, torch threads, the CPU kernels' vector extension, the GPU if any, and the fp32 1024^3 matmul rate
    of the device a run computes on (GPU when there is one)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpu": gpu,
            "fp32_matmul_gflops": round(matmul_rate(seconds=seconds, device="cuda" if gpu else "cpu"), 1)}


def describe(info: dict) -> str:
    """One line for a summary: ``AMD EPYC, 2 threads (AVX2), fp32 matmul 130 GFLOP/s``."""
    where = info.get("gpu") or f"{info.get('cpu')}, {info.get('threads')} threads ({info.get('cpu_capability')})"
    return f"{where}, fp32 matmul {info.get('fp32_matmul_gflops'):.0f} GFLOP/s (1024^3)"
