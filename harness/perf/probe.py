"""Roofline probe: this machine's large-matmul FLOP/s in the run's dtype and its memory bandwidth.

FLOP/s: the fastest of a few n x n @ n x n matmuls (2 n^3 FLOPs each). Bandwidth: the fastest of
a few copies of a large tensor (every byte read once and written once: 2 x size bytes moved).
Both are measured peaks, what this machine and torch build reach on well-shaped work, not
datasheet numbers; measurements are divided by them to give MFU and the bandwidth fraction.
A CPU probe takes a few seconds; results are cached per (device, dtype) for the process.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch

from harness.models.loading import torch_dtype
from harness.perf.timing import is_cuda, timed

# (matmul n, bytes copied) per device type: large enough to reach the peak, small enough to be quick.
SIZES = {"cpu": (1024, 64 * 2**20), "cuda": (8192, 2**30)}


def _fastest(fn: Callable[[], Any], device: str, repeats: int, budget_s: float) -> float:
    """The shortest of up to ``repeats`` timed calls (after one warm-up), stopping at ``budget_s``."""
    fn()
    best, began = float("inf"), time.perf_counter()
    for _ in range(repeats):
        best = min(best, timed(fn, device)[1])
        if time.perf_counter() - began > budget_s:
            break
    return best


@functools.lru_cache(maxsize=None)
def probe(device: str = "cpu", dtype: str = "float32", repeats: int = 10, budget_s: float = 2.0) -> dict[str, Any]:
    """``peak_flops`` (FLOP/s) and ``peak_bandwidth`` (bytes/s) of ``device`` in ``dtype``."""
    n, copy_bytes = SIZES["cuda" if is_cuda(device) else "cpu"]
    kind = torch_dtype(dtype)
    began = time.perf_counter()
    a = torch.randn(n, n, device=device).to(kind)
    b = torch.randn(n, n, device=device).to(kind)
    out = torch.empty(n, n, device=device, dtype=kind)
    matmul_s = _fastest(lambda: torch.mm(a, b, out=out), device, repeats, budget_s)
    source = torch.empty(copy_bytes // out.element_size(), device=device, dtype=kind)
    target = torch.empty_like(source)
    copy_s = _fastest(lambda: target.copy_(source), device, repeats, budget_s)
    return {"peak_flops": 2 * n**3 / matmul_s, "peak_bandwidth": 2 * copy_bytes / copy_s, "device": device,
            "dtype": dtype, "matmul_n": n, "copy_bytes": copy_bytes, "seconds": time.perf_counter() - began}
