"""Timing primitives: device synchronisation, percentiles, peak memory, forward-call counting and timing.

Peak memory is the CUDA allocator's ``max_memory_allocated`` on a GPU; on the CPU it is the
process's peak resident set (VmHWM), reset before each measurement through
``/proc/self/clear_refs`` where the kernel allows it, else the lifetime peak (``getrusage``).
``PeakMemory.source`` names which one a number is.
"""
from __future__ import annotations

import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: str) -> None:
    """Wait for the kernels queued on ``device`` (a no-op on the CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """(fn's value, wall seconds), with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": sum(values) / len(values),
            "n": len(values)}


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` and ``peak.source``."""

    def __init__(self, device: str):
        self.device, self.bytes, self.source = device, 0, ""

    def __enter__(self) -> "PeakMemory":
        if is_cuda(self.device):
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda_max_memory_allocated"
        else:
            self.source = "cpu_peak_rss" if _reset_rss_peak() else "cpu_peak_rss_process_lifetime"
        return self

    def __exit__(self, *exc: Any) -> None:
        if is_cuda(self.device):
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = rss_peak_bytes()


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class ForwardCounter:
    """Counts a module's forward calls and the input positions they ran over (padding included)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls, self.tokens = module, 0, 0

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("decoder_input_ids"))
        self.calls += 1
        self.tokens += int(ids.numel()) if ids is not None else 0

    def __enter__(self) -> "ForwardCounter":
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class ForwardTimer:
    """Wall seconds spent inside a module's forward calls (the device synchronised around each)."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.module, self.device, self.seconds, self.calls = module, device, 0.0, 0

    def _start(self, module: torch.nn.Module, args: tuple) -> None:
        synchronize(self.device)
        self.began = time.perf_counter()

    def _stop(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self.began
        self.calls += 1

    def __enter__(self) -> "ForwardTimer":
        self.handles = [self.module.register_forward_pre_hook(self._start), self.module.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
