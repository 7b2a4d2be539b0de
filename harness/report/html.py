"""Self-contained HTML pages: inline CSS, figures embedded as base64 PNG data URIs, a few lines of
inline script (sortable columns), nothing fetched from the network."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from harness.report import Figure, Section


def breakable(text: str) -> Markup:
    """Escaped text that may wrap after underscores (long task names in column headers)."""
    return Markup(str(escape(text)).replace("_", "_<wbr>"))


def marked(text: str) -> Markup:
    """Escaped text with its footnote markers ([1], [2], ...) raised."""
    return Markup(re.sub(r"\[(\d+)\]", r'<sup class="mark">[\1]</sup>', str(escape(text))))


def data_uri(figure: Figure) -> str:
    return "data:image/png;base64," + base64.b64encode(figure.png).decode("ascii")


def render_html(title: str, sections: list[Section], *, subtitle: str = "", footer: str = "",
                nav: list[tuple[str, str]] | None = None) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "html.j2"]), trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(data_uri=data_uri, breakable=breakable, marked=marked)
    return env.get_template("page.html.j2").render(title=title, subtitle=subtitle, sections=sections,
                                                   footer=footer, nav=nav or [])


def write_html(path: Path, title: str, sections: list[Section], **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(title, sections, **kwargs), encoding="utf-8")
    return path
