"""User-facing errors: the CLI prints them on one line and exits with code 2."""
from __future__ import annotations

import difflib
from typing import Iterable


class HarnessError(Exception):
    """Bad input from the user: unknown names, missing files, malformed configuration."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> HarnessError:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listing = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
    return HarnessError(f"unknown {kind} '{name}'{hint} (known: {listing})")
