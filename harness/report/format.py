"""Numbers as the report prints them. A metric value is scaled by its spec's unit (fractions x100),
never by guessing from the metric's name."""
from __future__ import annotations

import json
import math
from typing import Any

from harness.scoring.metric import Metric

DASH = "–"


def fmt(value: float | None, stderr: float | None = None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    text = f"{value * scale:.{digits}f}"
    return text if stderr is None else f"{text} ± {stderr * scale:.{digits}f}"


def shown(spec: Metric, value: float | None, stderr: float | None = None, digits: int = 1) -> str:
    """A metric value (± its standard error) in the unit it is shown in: fractions x100."""
    return fmt(value, stderr, spec.scale, digits)


def number(value: Any, digits: int = 1, scale: float = 1) -> str:
    return f"{value * scale:,.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else DASH


def option(value: Any, width: int = 32) -> str:
    """A task option on one short line: strings and lists as JSON, cut to ``width`` characters."""
    text = str(value) if isinstance(value, (int, float)) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 1] + "…"
