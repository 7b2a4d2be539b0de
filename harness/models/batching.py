"""Batch sizing: a fixed size, or ``auto``, which starts large and halves on out-of-memory."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from harness.errors import HarnessError

T = TypeVar("T")
R = TypeVar("R")

AUTO_START = 64


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def parse_batch_size(value: int | str) -> tuple[int, bool]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO_START, True
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"--batch-size must be a positive integer or 'auto', not '{value}'") from None
    if size < 1:
        raise HarnessError(f"--batch-size must be a positive integer or 'auto', not '{value}'")
    return size, False


class AutoBatch:
    """Groups items into batches of at most ``size`` units of weight; ``auto`` backs off on OOM."""

    def __init__(self, batch_size: int | str):
        self.size, self.auto = parse_batch_size(batch_size)

    def describe(self) -> int | str:
        return f"auto:{self.size}" if self.auto else self.size

    def run(self, items: Sequence[T], fn: Callable[[list[T]], list[R]],
            weight: Callable[[T], int] = lambda item: 1) -> list[R]:
        out: list[R] = []
        start = 0
        while start < len(items):
            end, used = start, 0
            while end < len(items) and (end == start or used + weight(items[end]) <= self.size):
                used += weight(items[end])
                end += 1
            try:
                out.extend(fn(list(items[start:end])))
            except Exception as exc:
                if not (self.auto and is_oom(exc) and self.size > 1):
                    raise
                self.size //= 2
                _empty_cache()
                continue
            start = end
        return out


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
