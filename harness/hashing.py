"""Stable content hashes: the same object gives the same hash in every process and version of Python."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from typing import Any


def stable_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted-key JSON (``str`` for anything else)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_text(text: str) -> str:
    """The SHA-256 hex digest of ``text`` (lm-eval's ``hash_string``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def to_jsonable(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) else obj
