"""Reports read only the store: tables, plots and the paper-reproduction view, rendered as Markdown and HTML.

The building blocks below are what every view produces and every renderer consumes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

NUMBER = r"[\d,.]+(e-?\d+)?"
NUMERIC = re.compile(rf"^[(+\-−]?{NUMBER}\)?( ± {NUMBER})?( \S+)?$|^–$")


@dataclass(frozen=True)
class Link:
    """A table cell that links to another page of the site."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str | Link]]
    settings: list[str] = field(default_factory=list)  # effective settings, shown above the header
    subheader: list[str] = field(default_factory=list)  # per-column settings under the header (HTML)
    notes: list[str] = field(default_factory=list)  # footnotes, numbered [1], [2], ... in the cells
    collapsed: bool = False  # one click away (HTML <details>): secondary views, reference text

    def numeric(self) -> list[bool]:
        """Columns whose cells are all numbers (right-aligned by the renderers)."""
        return [bool(self.rows) and all(NUMERIC.match(str(row[i])) for row in self.rows) and
                any(str(row[i]) != "–" for row in self.rows) for i in range(len(self.header))]


@dataclass
class Figure:
    name: str  # file stem for the Markdown report's PNG
    title: str
    png: bytes
    caption: str = ""  # names the settings behind the picture
    table: Table | None = None  # the same numbers, as a table


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


class Footnotes:
    """Numbers distinct note texts in order of first use: ``ref(text) -> "[n]"``."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def refs(self, texts: list[str]) -> str:
        return "".join(self.ref(t) for t in texts)

    def listing(self) -> list[str]:
        return [f"[{i}] {text}" for i, text in enumerate(self.texts, 1)]
