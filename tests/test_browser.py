"""The HTML report in a real headless browser (Debian's chromium): tables, figures, sorting, screenshots;
and the Markdown tables' structure."""
import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.report.commands import leaderboard, report
from test_report_views import wide_store
from test_reports import ACCURACY, make_store

DEMO = Path(__file__).resolve().parent.parent / "reports" / "demo" / "index.html"
# Run in the page once it has loaded: counts broken figures, then clicks a column header twice.
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var out = {images: images.length, broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length,
             sticky: getComputedStyle(document.querySelector("thead th")).position, sorted: []};
  var table = document.querySelector(".table-block table.sortable");
  var heads = table ? table.querySelectorAll("thead tr:first-child th") : [];
  var column = Array.prototype.findIndex.call(heads, function (h) { return h.textContent === "%s"; });
  if (column >= 0) for (var k = 0; k < 2; k++) {
    heads[column].click();
    out.sorted.push(Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[0].textContent; }));
  }
  var pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; installed with apt-get when missing and running as root."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {exc}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed no chromium binary")
    return found


def browse(chromium: str, page: Path, tmp_path: Path, *extra: str) -> str:
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra,
                             page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Tables(HTMLParser):
    """Every <table> of a page as {"title": preceding <h3>, "rows": [[cell text]]} (header rows included)."""

    def __init__(self):
        super().__init__()
        self.tables, self.title, self.cell, self.in_h3 = [], "", None, False

    def handle_starttag(self, tag, attrs):
        if tag == "h3":
            self.in_h3, self.title = True, ""
        elif tag == "table":
            self.tables.append({"title": self.title, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "h3":
            self.in_h3 = False
        elif tag in ("td", "th") and self.cell is not None:
            self.tables[-1]["rows"][-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.in_h3:
            self.title += data
        if self.cell is not None:
            self.cell += data


def parse_tables(dom: str) -> dict[str, list[list[str]]]:
    parser = Tables()
    parser.feed(dom)
    return {t["title"].strip(): t["rows"] for t in parser.tables}


def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.fixture()
def report_dir(tmp_path):
    store, _ = make_store(tmp_path / "store.sqlite")
    report([], all_runs=True, out=tmp_path / "report", store=store.path, output=tmp_path)
    return tmp_path / "report"


def test_report_renders_its_tables_in_chromium(chromium, report_dir, tmp_path):
    tables = parse_tables(browse(chromium, report_dir / "index.html", tmp_path, "--dump-dom"))
    board = tables["Suite accuracy-quick"]
    header, subheader, body = board[0], board[1], board[2:]
    assert header[:5] == ["Model", "Family", "Scoring", "dtype", "Seed"] and header[5:] == ["piqa", "hellaswag"]
    assert "n=60" in subheader[5]
    assert sorted(row[0] for row in body) == sorted(ACCURACY)
    assert all(re.fullmatch(r"\d+\.\d ± \d+\.\d", cell) for row in body for cell in row[5:])
    assert len(tables["Each DLM against its AR parent and the best AR model"]) == 1 + 4
    assert len(tables["Harness numbers next to published ones"]) == 1 + 6
    assert [row[0] for row in tables["Hardware fingerprints"][1:]] == ["H1", "H2"]


def test_report_screenshot_is_a_png(chromium, report_dir, tmp_path):
    shot = tmp_path / "report.png"
    browse(chromium, report_dir / "index.html", tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert struct.unpack(">II", data[16:24]) == (1280, 2000)


def test_leaderboard_links_resolve(chromium, tmp_path):
    store, _ = make_store(tmp_path / "store.sqlite")
    leaderboard(out=tmp_path / "site", store=store.path, output=tmp_path)
    dom = browse(chromium, tmp_path / "site" / "index.html", tmp_path, "--dump-dom")
    links = re.findall(r'href="(runs/[^"]+\.html)"', dom)
    # the Runs table links every run; each leaderboard row (eval runs) links its run too
    assert sorted(set(links)) == sorted(f"runs/{run['run_id']}.html" for run in store.runs())
    assert len(links) == len(store.runs()) + 2 * len(ACCURACY)  # the primary and the every-metric leaderboard
    assert all((tmp_path / "site" / link).is_file() for link in links)
    page = parse_tables(browse(chromium, tmp_path / "site" / links[0], tmp_path, "--dump-dom"))
    assert page["What produced these numbers"][1] == ["Run", links[0][5:-5]]


def probe(chromium: str, page: Path, tmp_path: Path, column: str = "") -> dict:
    """The page (a copy, with PROBE added) after it loaded in chromium: figures, sticky header, sort."""
    copy = tmp_path / f"probed-{page.name}"  # pages are self-contained: figures are embedded
    copy.write_text(page.read_text().replace("</body>", PROBE % column + "</body>"))
    dom = browse(chromium, copy, tmp_path, "--dump-dom", "--virtual-time-budget=10000")
    return json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1))


def screenshot(chromium: str, page: Path, tmp_path: Path, name: str) -> bytes:
    shot = tmp_path / f"{name}.png"
    browse(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    return shot.read_bytes()


def test_every_figure_loads_and_columns_sort(chromium, report_dir, tmp_path):
    seen = probe(chromium, report_dir / "index.html", tmp_path, "Model")
    assert seen["images"] == 4 and seen["broken"] == 0 and seen["sticky"] == "sticky"
    assert seen["sorted"] == [sorted(ACCURACY), sorted(ACCURACY, reverse=True)]


def test_a_30_by_20_leaderboard_sorts_in_chromium(chromium, tmp_path):
    store = wide_store(tmp_path / "store.sqlite")
    leaderboard(out=tmp_path / "site", store=store.path, output=tmp_path)
    seen = probe(chromium, tmp_path / "site" / "index.html", tmp_path, "task_05")
    models = [f"model-{i:02d}" for i in range(30)]  # run i scores (i + 5) % 97 on task_05: ascending with i
    assert seen["sorted"] == [models, models[::-1]] and seen["broken"] == 0 and seen["images"] >= 1
    assert screenshot(chromium, tmp_path / "site" / "index.html", tmp_path, "wide")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not DEMO.is_file(), reason="no committed demo report")
def test_the_committed_demo_report_loads(chromium, tmp_path):
    seen = probe(chromium, DEMO, tmp_path)
    assert seen["images"] >= 4 and seen["broken"] == 0 and seen["sticky"] == "sticky"  # as `make demo` writes it
    assert screenshot(chromium, DEMO, tmp_path, "demo")[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_tables_parse(report_dir):
    tables = markdown_tables((report_dir / "index.md").read_text())
    assert len(tables) >= 6
    for table in tables:
        assert re.fullmatch(r"(---:?\|?)+", "|".join(table[1])), table[:2]
        assert all(len(row) == len(table[0]) for row in table), table[0]
