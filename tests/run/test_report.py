"""report.html: written by every run, rebuilt by ``sft-job report``, and opened in a real browser."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from tests.file_server import FileServer
from tests.helpers import REPO, cli, events, filled_cache, smoke_run, start_cli, wait_for_event


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
    cache = filled_cache(out / "cache", shared_data)
    judge = FakeOllama().start()
    # The smoke model's sampled words rarely overlap the expected outputs: scripted scores spread the table.
    judge.faults.extend(("reply", json.dumps({"score": s})) for s in (12, 85, 40, 3, 97, 55, 61, 20))
    try:
        result = cli(*smoke_run(cache, out, "rep", "--judge-url", judge.url))
    finally:
        judge.stop()
    assert result.returncode == 0, result.stderr
    assert any(e["event"] == "report_written" for e in events(result.stdout))
    (out / "events.jsonl").write_text(result.stdout)
    return out / "rep"


def _figures(text: str) -> dict[str, str]:
    table = text.split('<table class="figures">', 1)[1].split("</table>", 1)[0]
    return dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", table))


def test_the_reports_figures_are_the_runs_own_totals_inputs_and_scores(judged_smoke, shared_data):
    text = (judged_smoke / "report.html").read_text()
    figures = _figures(text)
    [done] = [e for e in events((judged_smoke.parent / "events.jsonl").read_text()) if e["event"] == "finetune_done"]
    losses = json.loads((judged_smoke / "losses.json").read_text())
    # The whole training's tokens, not the last evaluation's count (the smoke's last is before its end).
    assert figures["Tokens and steps trained"] == f"{done['tokens_seen']:,} in {done['steps']:,} steps"
    assert done["tokens_seen"] > losses[-1]["tokens_seen"]
    data = judged_smoke.parent / "cache" / "instruction-data.json"  # the fixture's copy of the book's data
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    assert figures["Model"] == "random 2-layer GPT-2 (the smoke&#x27;s own, seed 123), byte tokenizer"
    assert figures["Data"] == f"{data} (sha256 {sha[:12]}…)"
    config = (judged_smoke / "config.yaml").read_text().splitlines()
    assert config[:2] == [
        "# model used: random 2-layer GPT-2 (the smoke's own, seed 123), byte tokenizer",
        f"# data used: {data} (sha256 {sha})",
    ]
    summary = json.loads((judged_smoke / "summary.json").read_text())
    assert figures["Mean / median score"] == f"{summary['mean']:.1f} / {summary['median']:.1f}"
    assert "Click a column&#x27;s header" not in text  # the caption is the page's own text, not escaped twice
    assert "Green rows are the 4 best scores, red the 4 worst." in text


def _readme_layout() -> set[str]:
    """The top-level names the README's run-folder layout lists (a size's .pth as ``*-sft.pth``)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("\n{run_id}/config.yaml", 1)[1].split("```", 1)[0]
    names = set()
    for line in ("{run_id}/config.yaml" + block).splitlines():
        listed = line.removeprefix("{run_id}/").split("  ")[0]
        first, *rest = [n.strip() for n in listed.split(",")]
        names.add(first.split("/")[0])
        names |= {n for n in rest if "/" not in first}  # more files beside a top-level one
    return {re.sub(r"^gpt2-medium355M-", "*-", n) for n in names if n}


def test_the_readmes_layout_names_everything_a_smoke_run_writes(judged_smoke):
    # .lock is the run lock object (README: Security), not a result
    written = {re.sub(r"^.*-(sft|dpo)\.pth$", r"*-\1.pth", p.name) for p in judged_smoke.iterdir() if p.name != ".lock"}
    assert written - _readme_layout() == set()
    assert {"smoke-model", "report.html", "*-sft.pth", "checkpoints"} <= written


def test_a_run_without_scores_says_why_and_colours_no_row(judged_smoke, tmp_path):
    import yaml

    from job.run.report import render

    run = tmp_path / "run"
    shutil.copytree(judged_smoke, run)
    for name in ("scores.json", "summary.json"):
        (run / name).unlink()
    config = yaml.safe_load((run / "config.yaml").read_text()) | {"skip_judge": True}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    page, parsed = render(run), ReportParser()
    parsed.feed(page)
    assert _figures(page)["Judge"] == "The judge was skipped (--skip-judge): no scores."
    assert "The judge was skipped" in page.split('id="entries"')[0].rsplit("<p>", 1)[1]  # the table's caption
    assert "Green rows" not in page and set(parsed.row_classes) == {None}
    (run / "config.yaml").write_text(yaml.safe_dump(config | {"skip_judge": False}))
    assert _figures(render(run))["Judge"] == "No scores yet: the judge stage has not completed."
    # Scores all equal: nothing is best or worst, and the caption does not say otherwise.
    shutil.copy(judged_smoke / "summary.json", run)
    scores = json.loads((judged_smoke / "scores.json").read_text())
    (run / "scores.json").write_text(json.dumps([e | {"score": 50} for e in scores]))
    page, parsed = render(run), ReportParser()
    parsed.feed(page)
    assert "Green rows" not in page and set(parsed.row_classes) == {None} and "Judge" in _figures(page)


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
        page.click("#entries th:has-text('Score')")
        assert [int(s) for s in column(5)] == sorted(scores, reverse=True)
        # the rows move with their scores: the entries' numbers in the order of their scores, highest first
        assert column(1) == [str(i + 1) for i in sorted(range(8), key=lambda i: -scores[i])]
        page.click("#entries th:has-text('#')")
        assert column(1) == [str(i) for i in range(1, 9)]
        assert page.locator("img").count() == 2 and page.evaluate("document.images[0].naturalWidth") > 0
        browser.close()
    assert errors == []


def _in_chromium(report, read):
    """``read(page)`` on ``report`` opened in Chromium, failing on any console or page error."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: scripts/install-test-deps.sh installs it"
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        result = read(page)
        browser.close()
    assert errors == []
    return result


def _figure_texts(page) -> dict[str, str]:
    cells = page.locator("table.figures tr td").all_inner_texts()
    return dict(zip(cells[::2], cells[1::2], strict=True))


def test_a_run_that_failed_in_download_has_a_report_naming_the_stage_and_its_error_line(cache, tmp_path):
    # A mirror that answers (the preflight asks its host) but holds nothing: the weights' download fails in
    # the download stage, exit 1, after the preflight passed and the run folder exists.
    with FileServer({}) as mirror:
        args = smoke_run(cache, tmp_path / "runs", "offline", "--skip-judge", "--base-url", f"{mirror.url}/m")
        done = cli(*[a for a in args if a != "--smoke"])
    assert done.returncode == 1, done.stderr[-2000:]
    error = done.stderr.strip().splitlines()[-1].removeprefix("Error: ")
    assert "404" in error and "gpt2" in error, error
    run = tmp_path / "runs" / "offline"
    figures = _in_chromium(run / "report.html", _figure_texts)
    assert figures["Status"] == f"failed in stage download: {error}"
    assert figures["Test entries"] == "none yet (no responses)"
    stages = _in_chromium(run / "report.html", lambda page: page.locator("#stages tr").all_inner_texts())
    [[name, status, seconds, said]] = [s.split("\t") for s in stages[1:]]
    assert (name, status, said) == ("download", "failed", error) and float(seconds) >= 0  # as long as it ran
    rebuilt = cli("report", run, "--output", tmp_path / "again.html")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "again.html").read_text() == (run / "report.html").read_text()


def _drawn_with(png: bytes) -> tuple[str, dict]:
    """A plot's title and what it was drawn over (epochs, evaluations), from its PNG's text chunks."""
    import io

    from PIL import Image

    text = Image.open(io.BytesIO(png)).text
    return text["Title"], json.loads(text["Description"])


def test_a_dpo_run_with_one_evaluation_shows_each_plot_titled_over_the_epochs_trained(cache, tmp_path):
    # 3 of the 5 steps an epoch of the smoke: one evaluation in each stage, 0.6 of the 2 epochs asked for
    args = smoke_run(cache, tmp_path, "dpo1", "--skip-judge", "--dpo", "--max-steps", 3, "--dpo-epochs", 2)
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "dpo1"
    # Every file the report read is the one the manifest recorded, the sft/ and dpo/ ones included.
    assert 'id="warnings"' not in (run / "report.html").read_text()
    assert not [e for e in events(done.stdout) if e["event"] == "report_input_untrusted"]

    def plots(page):
        captions = page.locator(".plots figcaption").all_inner_texts()
        widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        sources = page.evaluate("Array.from(document.images).map(i => i.src)")
        return captions, widths, sources

    captions, widths, sources = _in_chromium(run / "report.html", plots)
    assert captions == [
        "Finetune loss: training and validation",
        "DPO loss: training and validation",
        "DPO reward margins: training and validation",
    ]
    assert all(w > 0 for w in widths)
    titles = [_drawn_with(base64.b64decode(src.split(",", 1)[1]))[0] for src in sources]
    assert titles == ["Finetune loss", "DPO loss", "DPO reward margins"]
    for stage, plot_files in (("", ["loss-plot.png"]), ("dpo/", ["loss-plot.png", "reward-margins-plot.png"])):
        trained = json.loads((run / stage / "model" / "config.json").read_text())["sft_job"]["trained"]
        assert trained["epochs"] == 0.6
        for name in plot_files:
            _, drawn = _drawn_with((run / stage / name).read_bytes())
            assert drawn == {"epochs": trained["epochs"], "evaluations": 1}, (stage, name)


def test_one_evaluation_is_drawn_as_a_point_with_plain_tick_labels():
    from job.training.outputs import loss_figure, reward_margin_figure

    # one DPO evaluation: the losses differ in the 7th digit, where an offset label would hide the ticks
    entry = {"train_loss": 0.6930701, "val_loss": 0.6930712, "tokens_seen": 9104}
    entry |= {"train_chosen_reward": 2e-7, "train_rejected_reward": 0.0}
    entry |= {"val_chosen_reward": 0.0, "val_rejected_reward": 1e-7}
    for fig in (loss_figure([entry], 0.2, "DPO loss"), reward_margin_figure([entry], 0.2, "DPO reward margins")):
        fig.canvas.draw()
        ax = fig.axes[0]
        assert fig.get_suptitle() in ("DPO loss", "DPO reward margins")
        assert len(ax.lines) == 2 and all(line.get_marker() not in ("None", "", None) for line in ax.lines)
        for axis in (ax.xaxis, ax.yaxis):  # a scale (1e-7) may stand above the axis; no offset added to ticks
            assert axis.get_major_formatter().offset == 0 and "+" not in axis.get_offset_text().get_text()
        assert ax.get_xlim()[0] < 0 < 0.2 < ax.get_xlim()[1]  # the epochs trained, the point inside


def _report_of_copy(judged_smoke, run, *args):
    """`sft-job report` on ``run`` (a copy of the judged smoke run, edited by the test): its page and events."""
    done = cli("report", run, "--log-format", "json", *args)
    assert done.returncode == 0, done.stderr
    return (run / "report.html").read_text(), events(done.stdout)


def _warned(page: str, found: list[dict]) -> dict[str, str]:
    shown = dict(re.findall(r"<li>(.*?): (.*?)</li>", page.split('id="warnings"', 1)[1].split("</div>", 1)[0]))
    logged = {e["file"]: e["problem"] for e in found if e["event"] == "report_input_untrusted"}
    assert shown == logged
    return shown


def test_the_report_says_which_files_differ_from_what_the_manifest_records(judged_smoke, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(judged_smoke, run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert "losses.json" in manifest["stages"]["finetune"]["artifacts"]
    page, found = _report_of_copy(judged_smoke, run)
    assert 'id="warnings"' not in page and not [e for e in found if e["event"] == "report_input_untrusted"]
    losses = json.loads((run / "losses.json").read_text())
    extra = losses[-1] | {"step": losses[-1]["step"] + 1, "val_loss": 0.001}
    (run / "losses.json").write_text(json.dumps([*losses, extra]))  # an evaluation the run never made
    page, found = _report_of_copy(judged_smoke, run)
    assert _warned(page, found) == {"losses.json": "changed since the run recorded it"}
    (run / "losses.json").write_text("[]")
    (run / "scores.json").write_text(json.dumps(json.loads((judged_smoke / "scores.json").read_text())[:3]))
    page, found = _report_of_copy(judged_smoke, run)
    changed = "changed since the run recorded it"
    assert _warned(page, found) == {"losses.json": changed, "scores.json": changed}
    (run / "losses.json").unlink()
    shutil.copy(judged_smoke / "scores.json", run / "scores.json")  # back as recorded: no warning for it
    page, found = _report_of_copy(judged_smoke, run)
    assert _warned(page, found) == {"losses.json": "missing"}


def test_report_names_a_source_that_is_a_file_and_a_report_path_that_is_a_folder(judged_smoke, tmp_path):
    note = tmp_path / "some-file.txt"
    note.write_text("not a run")
    refused = cli("report", note)
    assert refused.returncode == 2 and f"{note} is not a folder" in refused.stderr, refused.stderr
    refused = cli("report", "")
    assert refused.returncode == 2 and "Error: the run to report on is empty" in refused.stderr, refused.stderr
    run = tmp_path / "run"
    shutil.copytree(judged_smoke, run)
    (run / "report.html").unlink()
    (run / "report.html").mkdir()
    refused = cli("report", run)
    assert refused.returncode == 2, refused.stderr
    assert [f"Error: {run / 'report.html'} is a folder: remove it, or write the report elsewhere (--output)"] == (
        refused.stderr.strip().splitlines()[-1:]
    )
    assert cli("report", run, "--output", tmp_path / "elsewhere.html").returncode == 0


def test_the_last_evaluations_step_is_the_one_losses_json_names_and_the_histogram_is_titled(judged_smoke):
    text = (judged_smoke / "report.html").read_text()
    last = json.loads((judged_smoke / "losses.json").read_text())[-1]
    assert f"at step {last['step']:,}, " in _figures(text)["Training loss at the last evaluation"]
    page = ReportParser()
    page.feed(text)
    histogram = base64.b64decode(page.images[-1].split(",", 1)[1])
    assert _drawn_with_title(histogram) == "Judge score histogram"


def _drawn_with_title(png: bytes) -> str:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).text["Title"]


def test_a_stage_stopped_then_completed_by_a_rerun_keeps_no_error_and_counts_its_attempts(cache, tmp_path):
    import signal

    args = smoke_run(cache, tmp_path, "again", "--skip-judge", "--checkpoint-every", 2)
    proc = start_cli(*args)
    wait_for_event(proc, lambda e: e.get("event") == "checkpoint", deadline_s=300)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "stopped by SIGINT at step" in err.strip().splitlines()[-1]  # the signal that came, named
    stopped = json.loads((tmp_path / "again" / "manifest.json").read_text())["stages"]["finetune"]
    assert stopped["status"] == "interrupted" and "SIGINT" in stopped["error"] and stopped["duration_s"] > 0
    page = (tmp_path / "again" / "report.html").read_text()
    assert "No loss plot: the finetune stage was interrupted" in page
    figures = _figures(page)  # the step-0 evaluation and any after it, from the checkpoint the signal left
    assert figures["Loss history"].startswith("the finetune stage did not complete: its evaluations so far")
    assert int(figures["Evaluations"]) >= 1 and re.search(
        r"\(at step \d+, ", figures["Training loss at the last evaluation"]
    )
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    finetune = json.loads((tmp_path / "again" / "manifest.json").read_text())["stages"]["finetune"]
    assert finetune["status"] == "complete" and finetune.get("error") is None and finetune["attempts"] == 2
    row = re.search(
        r"<tr><td>finetune</td><td>complete</td><td[^>]*>[0-9.]+</td><td>(.*?)</td></tr>",
        (tmp_path / "again" / "report.html").read_text(),
    )
    assert row is not None and row[1] == ""


def test_a_report_from_a_bucket_checks_what_it_fetched_against_the_manifest(judged_smoke, s3, tmp_path):
    s3.create_bucket(Bucket="copies")
    for path in judged_smoke.rglob("*"):
        if path.is_file() and "checkpoints" not in path.parts:
            s3.put_object(Bucket="copies", Key=f"r/{path.relative_to(judged_smoke)}", Body=path.read_bytes())
    s3.delete_object(Bucket="copies", Key="r/losses.json")
    s3.put_object(Bucket="copies", Key="r/summary.json", Body=(judged_smoke / "summary.json").read_bytes() + b" ")
    done = cli("report", "s3://copies/r", "--output", tmp_path / "r.html", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    changed = "changed since the run recorded it"
    assert _warned(page, events(done.stdout)) == {"losses.json": "missing", "summary.json": changed}
