"""Numbers as the report prints them. A metric value is scaled by its spec's unit (fractions x100),
never by guessing from the metric's name, and printed to its standard error's precision: one
significant digit of the standard error (two when it starts with 1), at least one decimal, and
mantissa-exponent form (``1.0e19``) past a million."""
from __future__ import annotations

import json
import math
from typing import Any

from harness.scoring.metric import Metric

DASH = "–"
LARGE = 1e6  # from here on, numbers print as 1.0e19


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def se_digits(stderr: float | None, default: int = 1) -> int:
    """Decimals that show ``stderr`` to its precision (1 to 4, see above); ``default`` without one."""
    if not finite(stderr) or stderr <= 0:
        return default
    exponent = math.floor(math.log10(stderr))
    leading_one = f"{stderr / 10 ** exponent:.0f}" == "1"
    return min(4, max(1, -exponent + leading_one))


def scientific(x: float) -> str:
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt(value: float | None, stderr: float | None = None, scale: float = 1.0, digits: int | None = None) -> str:
    """``value ± stderr`` (x ``scale``), to ``digits`` decimals or else to the standard error's precision."""
    if not finite(value):
        return DASH
    v, se = value * scale, stderr * scale if finite(stderr) else None
    if abs(v) >= LARGE or (se is not None and se >= LARGE):
        return scientific(v) + ("" if se is None else f" ± {scientific(se)}")
    d = se_digits(se) if digits is None else digits
    return f"{v:.{d}f}" + ("" if se is None else f" ± {se:.{d}f}")


def shown(spec: Metric, value: float | None, stderr: float | None = None, digits: int | None = None) -> str:
    """A metric value (± its standard error) in the unit it is shown in: fractions x100."""
    return fmt(value, stderr, spec.scale, digits)


def number(value: Any, digits: int = 1, scale: float = 1) -> str:
    if not finite(value):
        return DASH
    return scientific(value * scale) if abs(value * scale) >= LARGE * 1000 else f"{value * scale:,.{digits}f}"


def option(value: Any, width: int = 32) -> str:
    """A task option on one short line: strings and lists as JSON, cut to ``width`` characters."""
    text = str(value) if isinstance(value, (int, float)) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 1] + "…"
