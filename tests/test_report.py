"""report.html: written by every run, rebuilt by ``sft-job report``, and opened in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from tests.helpers import cli, events, smoke_run


class ReportParser(HTMLParser):
    """The report's images and the entries table's rows (each a list of (attributes, text) cells)."""

    def __init__(self):
        super().__init__()
        self.images, self.rows, self.row_classes, self.headers = [], [], [], []
        self._in_entries = self._cell = False
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "table" and a.get("id") == "entries":
            self._in_entries = True
        elif self._in_entries and tag == "tr":
            self.rows.append([])
            self.row_classes.append(a.get("class"))
        elif self._in_entries and tag in ("td", "th"):
            self._cell, self._text, self._attrs = True, [], a

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_entries = False
        elif self._in_entries and tag in ("td", "th"):
            self.rows[-1].append((self._attrs, "".join(self._text)))
            self._cell = False

    def handle_data(self, data):
        if self._cell:
            self._text.append(data)


@pytest.fixture(scope="module")
def judged_smoke(shared_data, tmp_path_factory):
    from tests.ollama_server import FakeOllama

    out = tmp_path_factory.mktemp("report")
    judge = FakeOllama().start()
    # The smoke model's sampled words rarely overlap the expected outputs: scripted scores spread the table.
    judge.faults.extend(("reply", json.dumps({"score": s})) for s in (12, 85, 40, 3, 97, 55, 61, 20))
    try:
        result = cli(*smoke_run(shared_data, out, "rep", "--judge-url", judge.url))
    finally:
        judge.stop()
    assert result.returncode == 0, result.stderr
    assert any(e["event"] == "report_written" for e in events(result.stdout))
    return out / "rep"


def test_every_run_writes_a_self_contained_report_with_both_plots_and_every_entry(judged_smoke):
    page = ReportParser()
    text = (judged_smoke / "report.html").read_text()
    page.feed(text)
    assert len(page.images) == 2  # the loss plot and the score histogram, embedded
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"""(src|href)=["'](?!data:)""", text) is None  # nothing to fetch when viewed
    scores = json.loads((judged_smoke / "scores.json").read_text())
    header, *rows = page.rows
    assert [t for _, t in header] == ["#", "Instruction", "Expected", "Response", "Score"]
    assert len(rows) == len(scores) == 8
    for row, entry in zip(rows, scores, strict=True):
        assert row[2][1] == entry["output"] and row[3][1] == entry["model_response"]
        assert row[4][1] == str(entry["score"])
    assert (
        page.row_classes[1:].count("best") == page.row_classes[1:].count("worst") == 4
    )  # 5 each, or half of fewer than 10
    best = max(s["score"] for s in scores)
    assert any(c == "best" and int(r[4][1]) == best for c, r in zip(page.row_classes[1:], rows, strict=True))


def test_report_command_rebuilds_the_same_page_from_the_run_folder(judged_smoke, tmp_path):
    result = cli("report", judged_smoke, "--output", tmp_path / "again.html", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "again.html").read_text() == (judged_smoke / "report.html").read_text()
    missing = cli("report", tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().endswith("give the folder or s3:// prefix of one run")


def test_the_report_opens_in_chromium_without_errors_and_sorts_by_score(judged_smoke):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: scripts/install-test-deps.sh installs it"
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((judged_smoke / "report.html").as_uri())

        def column(index: int) -> list[str]:
            return page.locator(f"#entries tbody tr td:nth-child({index})").all_inner_texts()

        assert column(1) == [str(i) for i in range(1, 9)]
        scores = [int(s) for s in column(5)]
        assert len(set(scores)) > 1, scores
        page.click("#entries th:has-text('Score')")
        assert [int(s) for s in column(5)] == sorted(scores)
        first_ascending = column(1)[0]
        page.click("#entries th:has-text('Score')")
        assert [int(s) for s in column(5)] == sorted(scores, reverse=True)
        assert "1" != first_ascending or "1" != column(1)[0]  # the first row changed
        page.click("#entries th:has-text('#')")
        assert column(1) == [str(i) for i in range(1, 9)]
        assert page.locator("img").count() == 2 and page.evaluate("document.images[0].naturalWidth") > 0
        browser.close()
    assert errors == []
