"""What a metric is, as data: its aggregation, its direction, its unit and whether it is the task's primary one.

Tasks declare their metrics as ``Metric`` specs; the runner aggregates with them and stores them
with each task result, and every report view reads units and direction from the stored specs.

A unit says how a value is stored and how it is shown:

``fraction``    a proportion in [0, 1] (accuracy, exact match, F1, pass@1): shown x100 with "%"
``percent``     already x100 when stored (ROUGE F-measures): shown as is with "%"
``perplexity``  exp of a negative mean log-likelihood: shown as is, no "%"
``nats``        a log-likelihood or loss in nats: shown as is, no "%"
``bits``        bits (per byte, per token): shown as is, no "%"
``number``      a plain number with no declared unit: shown as is, no "%" (the conservative
                default for metrics whose spec is unknown, see ``undeclared``)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

from harness.errors import HarnessError
from harness.scoring.metrics import AGGREGATIONS


@dataclass(frozen=True)
class Unit:
    scale: float  # shown value = stored value x scale
    percent: bool  # shown with "%"
    meaning: str


UNITS: dict[str, Unit] = {
    "fraction": Unit(100, True, "a proportion in [0, 1], shown x100 in %"),
    "percent": Unit(1, True, "stored x100 already, shown as is in %"),
    "perplexity": Unit(1, False, "a perplexity, shown as is"),
    "nats": Unit(1, False, "nats, shown as is"),
    "bits": Unit(1, False, "bits, shown as is"),
    "number": Unit(1, False, "a number without a declared unit, shown as is"),
}


@dataclass(frozen=True)
class Metric:
    """One metric of a task. ``higher_is_better`` is None only for an undeclared metric (an old store)."""

    name: str
    aggregation: str  # a name in harness.scoring.metrics.AGGREGATIONS
    higher_is_better: bool | None
    unit: str  # a key of UNITS
    primary: bool = False  # the task's headline metric (leaderboards, DLM vs AR); exactly one a task

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise HarnessError(f"metric '{self.name}': unknown unit '{self.unit}' (known: {', '.join(UNITS)})")
        if self.aggregation not in AGGREGATIONS:
            raise HarnessError(f"metric '{self.name}': unknown aggregation '{self.aggregation}' "
                               f"(known: {', '.join(AGGREGATIONS)})")
        if not (self.higher_is_better is None or isinstance(self.higher_is_better, bool)):
            raise HarnessError(f"metric '{self.name}': higher_is_better must be true or false")

    @property
    def scale(self) -> float:
        """The factor from the stored value to the shown one (100 for fractions)."""
        return UNITS[self.unit].scale

    @property
    def percent(self) -> bool:
        return UNITS[self.unit].percent

    @property
    def label(self) -> str:
        """The metric's name as a column or axis label: "acc (%)", "word_perplexity"."""
        return self.name + (" (%)" if self.percent else "")

    def rank(self, value: float) -> float:
        """A sort key under which the best value is the largest (raises for an undeclared direction)."""
        if self.higher_is_better is None:
            raise HarnessError(f"metric '{self.name}' declares no direction")
        return value if self.higher_is_better else -value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Metric":
        return cls(str(data["name"]), str(data["aggregation"]), data.get("higher_is_better"), str(data["unit"]),
                   bool(data.get("primary", False)))


def undeclared(name: str, primary: bool = False) -> Metric:
    """The conservative stand-in for a metric without a stored or declared spec: shown as stored (no
    x100, no "%"), no direction (so never ranked), a mean."""
    return Metric(name, "mean", None, "number", primary)


class Metrics(Mapping[str, Metric]):
    """A task's metric specs in declaration order, read as a mapping by metric name.

    Iterating yields the names, so ``metric in task.metrics`` and ``list(task.metrics)`` read as
    they did when tasks declared ``{name: aggregation}``; the values are the ``Metric`` specs.
    """

    def __init__(self, *specs: Metric):
        self._specs = {spec.name: spec for spec in specs}
        if len(self._specs) != len(specs):
            raise HarnessError(f"metric names repeat: {[s.name for s in specs]}")
        if specs and sum(spec.primary for spec in specs) != 1:
            raise HarnessError(f"exactly one of the metrics {', '.join(self._specs)} must be primary, "
                               f"not {sum(spec.primary for spec in specs)}")

    def __getitem__(self, name: str) -> Metric:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"Metrics({', '.join(map(repr, self._specs.values()))})"

    @property
    def primary(self) -> Metric | None:
        return next((spec for spec in self._specs.values() if spec.primary), None)

    @property
    def higher_is_better(self) -> dict[str, bool | None]:
        """{metric: bool}, as lm-eval's results.json has it."""
        return {name: spec.higher_is_better for name, spec in self._specs.items()}

    def to_list(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in self._specs.values()]

    @classmethod
    def from_list(cls, data: list[Mapping[str, Any]]) -> "Metrics":
        return cls(*(Metric.from_dict(item) for item in data))


def fraction_metrics(*names: str, primary: str | None = None) -> Metrics:
    """Mean-aggregated fractions where higher is better (accuracy, exact match, F1, pass@1): the
    common case. The first is primary unless ``primary`` names another."""
    first = primary or names[0]
    return Metrics(*(Metric(name, "mean", True, "fraction", name == first) for name in names))
