"""One small generic registry: register by name (objects or lazy "module:attr" strings), did-you-mean."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from harness.errors import unknown_name

T = TypeVar("T")


def import_string(path: str) -> Any:
    """Resolve "package.module:attr"."""
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Names to objects. Iteration lists the names sorted, or in registration order if ``ordered``."""

    def __init__(self, kind: str, *, ordered: bool = False):
        self.kind = kind
        self.ordered = ordered
        self._items: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, act as a decorator."""
        if obj is not None:
            self._items[name] = obj
            return obj

        def decorator(fn: Callable) -> Callable:
            self._items[name] = fn  # type: ignore[assignment]
            return fn

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise unknown_name(self.kind, name, self._items)
        item = self._items[name]
        if isinstance(item, str) and ":" in item:
            item = import_string(item)
            self._items[name] = item
        return item  # type: ignore[return-value]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        return list(self._items) if self.ordered else sorted(self._items)

    def values(self) -> list[T]:
        return [self.get(name) for name in self.names()]
