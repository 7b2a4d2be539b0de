"""Markdown rendering: pipe tables (GitHub style) and figures written next to the page as PNG files."""
from __future__ import annotations

import re
from pathlib import Path

import jinja2

from harness.report import Link, Section, Table


def safe_name(name: str) -> str:
    """A figure's file stem with only [A-Za-z0-9._-] (model names may hold '@' or '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def md_cell(cell: str | Link) -> str:
    text = f"[{cell.text}]({cell.href})" if isinstance(cell, Link) else str(cell)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(table: Table) -> str:
    numeric = table.numeric()
    lines = ["| " + " | ".join(md_cell(h) for h in table.header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def column_settings(table: Table) -> list[str]:
    """Per-column settings (the HTML sub-header) as list items."""
    return [f"{h}: {s}" for h, s in zip(table.header, table.subheader) if s]


def render_markdown(title: str, sections: list[Section], *, subtitle: str = "", footer: str = "",
                    figures: dict[str, str] | None = None) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(md_table=md_table, column_settings=column_settings)
    return env.get_template("report.md.j2").render(title=title, subtitle=subtitle, sections=sections,
                                                   footer=footer, figures=figures or {})


def write_markdown(path: Path, title: str, sections: list[Section], **kwargs) -> Path:
    """Write ``path`` and its figures as ``figures/<name>.png`` beside it."""
    figures = {}
    for figure in (f for s in sections for f in s.figures):
        target = path.parent / "figures" / f"{safe_name(figure.name)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(figure.png)
        figures[figure.name] = f"figures/{target.name}"
    path.write_text(render_markdown(title, sections, figures=figures, **kwargs), encoding="utf-8")
    return path
