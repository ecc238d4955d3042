"""``report.html``: one self-contained page per run, built from the run's own files.

The configuration, the loss plot, the judge-score histogram, every test entry with its expected
output, response and score in a table that sorts by any column (the 5 best and 5 worst marked),
the stages' durations and the run's figures. Images are embedded as data URIs and the sorting is a
few lines of inline script, so the page opens anywhere without a network.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from job.core.errors import ConfigError
from job.core.observability import get_logger
from job.core.parsing import ParseError, load_json, load_yaml, read_bounded, validated
from job.data.instructions import RESPONSES_FILE
from job.run.manifest import ManifestFile
from job.storage.store import LocalStorage, Storage, atomic_write_text, open_storage, sha256_file
from job.training.checkpoint_files import MAX_JSON_BYTES, TrainStateFile, checkpoint_dirs

log = get_logger(__name__)

REPORT = "report.html"
INPUTS = (
    "config.yaml",
    "manifest.json",
    "losses.json",
    "loss-plot.png",
    "model/config.json",
    "summary.json",
    "scores.json",
    RESPONSES_FILE,
)
DPO_INPUTS = (  # with run --dpo: the DPO stage's curves, and the finetuned model's responses and scores
    "dpo/losses.json",
    "dpo/model/config.json",
    "dpo/loss-plot.png",
    "dpo/reward-margins-plot.png",
    "sft/scores.json",
    f"sft/{RESPONSES_FILE}",
)
HIGHLIGHTED = 5  # best and worst entries marked in the table
HISTOGRAM_TITLE = "Judge score histogram"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; }
td, th { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; }
th[data-sort] { cursor: pointer; background: #f4f4f4; } th[data-sort]:hover { background: #e8e8e8; }
tr.best td { background: #e6f4ea; } tr.worst td { background: #fce8e6; }
td.text { white-space: pre-wrap; max-width: 28em; } td.num { text-align: right; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; } .figures td:first-child { font-weight: 600; }
.plots figure { display: inline-block; max-width: 48%; margin: 0 1% 1em 0; } .plots img { max-width: 100%; }
figcaption { text-align: center; color: #555; }
.warnings { background: #fff4e5; border: 1px solid #f0a030; padding: 0.5em 1em; }
"""

# Click a header: sort by that column (numbers by data-value), again to reverse.
SCRIPT = """
document.querySelectorAll("th[data-sort]").forEach(function (th) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], col = th.cellIndex, numeric = th.dataset.sort === "number";
    var dir = th.dataset.dir === "asc" ? -1 : 1;
    th.dataset.dir = dir === 1 ? "asc" : "desc";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      return dir * (numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y));
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


class LossRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    train_loss: float
    val_loss: float
    tokens_seen: int


class DPORecord(LossRecord):
    train_chosen_reward: float
    train_rejected_reward: float
    val_chosen_reward: float
    val_rejected_reward: float


class Trained(BaseModel):
    model_config = ConfigDict(extra="allow")
    steps: int
    tokens_seen: int


class Recorded(BaseModel):
    model_config = ConfigDict(extra="allow")
    trained: Trained | None = None


class ModelConfig(BaseModel):
    """A trained model's config.json: only what the report reads of it, the training's totals."""

    model_config = ConfigDict(extra="allow")
    sft_job: Recorded | None = None


class Summary(BaseModel):
    model_config = ConfigDict(extra="allow")
    judge_model: str
    judge_backend: str
    entries: int
    scored: int
    unparsed: int
    mean: float | None
    median: float | None


class Entry(BaseModel):
    model_config = ConfigDict(extra="allow")
    instruction: str = ""
    input: str = ""
    output: str = ""
    model_response: str = ""
    score: int | None = None


# What each input must hold before the page is built from it (a run read back from a bucket may
# have been changed by someone else): anything else is exit 1 naming the file and the field.
SHAPES = {
    "manifest.json": ManifestFile,
    "losses.json": list[LossRecord],
    "model/config.json": ModelConfig,
    "dpo/losses.json": list[DPORecord],
    "dpo/model/config.json": ModelConfig,
    "summary.json": Summary,
    "scores.json": list[Entry],
    RESPONSES_FILE: list[Entry],
    "sft/scores.json": list[Entry],
    f"sft/{RESPONSES_FILE}": list[Entry],
    "config.yaml": dict[str, Any],
}


def _read(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        return None
    if name.endswith(".png"):
        return path.read_bytes()
    data = path.read_bytes()
    value = load_yaml(data, name) if name.endswith(".yaml") else load_json(data, name)
    validated(SHAPES[name], value, name)
    return value


def _png(data: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def score_histogram(scores: list[int]) -> bytes:
    """The judge's scores in ten bins of 0-100, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(scores, bins=range(0, 101, 10), edgecolor="white")
    ax.set_xlabel("Judge score")
    ax.set_ylabel("Entries")
    ax.set_xlim(0, 100)
    fig.suptitle(HISTOGRAM_TITLE)  # titled inside the figure, as the loss plots are
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Title": HISTOGRAM_TITLE})
    plt.close(fig)
    return buffer.getvalue()


def _marks(entries: list[dict]) -> dict[int, str]:
    """The rows coloured: the best and the worst scores, none where the scores are all equal or absent."""
    scored = sorted((i for i, e in enumerate(entries) if e.get("score") is not None), key=lambda i: entries[i]["score"])
    varied = len({entries[i]["score"] for i in scored}) > 1
    n = min(HIGHLIGHTED, len(scored) // 2) if varied else 0
    return {i: "worst" for i in scored[:n]} | {i: "best" for i in scored[len(scored) - n :]}


def _caption(marks: dict[int, str], judged: str | None) -> str:
    caption = "Click a column's header to sort by it."
    if marks:
        n = len(marks) // 2
        caption += f" Green rows are the {n} best scores, red the {n} worst."
    if judged:
        caption += f" {judged}"
    return f"<p>{caption}</p>"


def _entries_table(entries: list[dict], marks: dict[int, str]) -> str:
    rows = []
    for i, entry in enumerate(entries):
        instruction = entry.get("instruction", "") + (f"\n\n{entry['input']}" if entry.get("input") else "")
        score = entry.get("score")
        cells = [
            f'<td class="num" data-value="{i}">{i + 1}</td>',
            *(
                f'<td class="text" data-value="{html.escape(text, quote=True)}">{html.escape(text)}</td>'
                for text in (instruction, entry.get("output", ""), entry.get("model_response", ""))
            ),
            f'<td class="num" data-value="{score if score is not None else -1}">'
            f"{score if score is not None else '&ndash;'}</td>",
        ]
        mark = f' class="{marks[i]}"' if i in marks else ""
        rows.append(f"<tr{mark}>{''.join(cells)}</tr>")
    head = "".join(
        f'<th data-sort="{kind}">{name}</th>'
        for name, kind in (("#", "number"), ("Instruction", "text"), ("Expected", "text"), ("Response", "text"))
    )
    head += '<th data-sort="number">Score</th>'
    return f'<table id="entries"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _side_by_side(finetuned: list[dict], tuned: list[dict]) -> str:
    """With --dpo: each test entry's response and score from the finetuned model beside the DPO model's."""
    if not finetuned:
        return ""

    def cell(text) -> str:
        return f"<td>{html.escape(str(text))}</td>"

    rows = "".join(
        f"<tr>{cell(i + 1)}{cell(a.get('instruction', ''))}{cell(a.get('model_response', ''))}"
        f"{cell(_score(a))}{cell(b.get('model_response', ''))}{cell(_score(b))}</tr>"
        for i, (a, b) in enumerate(zip(finetuned, tuned, strict=False))
    )
    head = "".join(f"<th>{h}</th>" for h in ("#", "Instruction", "Finetuned", "Score", "After DPO", "Score"))
    return f'<h2>Finetuned and after DPO</h2><table id="compared"><tr>{head}</tr>{rows}</table>'


def _score(entry: dict) -> str:
    return "–" if entry.get("score") is None else str(entry["score"])


def _training(losses: list[dict], model_config: dict | None) -> list[tuple[str, str]]:
    """The last evaluation's figures, said to be that (a run evaluates every few steps, so they can
    stop before its end), then the whole training's tokens and steps."""
    last = losses[-1]
    at = f"at step {last['step']:,}, " if isinstance(last.get("step"), int) else ""  # as losses.json and the log say
    rows = [
        ("Evaluations", str(len(losses))),
        ("First / last validation loss", f"{losses[0]['val_loss']:.3f} / {last['val_loss']:.3f}"),
        ("Training loss at the last evaluation", f"{last['train_loss']:.3f} ({at}{last['tokens_seen']:,} tokens seen)"),
    ]
    return rows + _trained(model_config, "Tokens and steps trained")


def _trained(model_config: dict | None, label: str) -> list[tuple[str, str]]:
    """The whole training's tokens and steps, as the trained model's config.json records them."""
    trained = ((model_config or {}).get("sft_job") or {}).get("trained")
    return [(label, f"{trained['tokens_seen']:,} in {trained['steps']:,} steps")] if trained else []


def _status(manifest) -> list[tuple[str, str]]:
    """Where a run that did not complete stopped, and the error it stopped with."""
    manifest = manifest or {}
    status, stopped = manifest.get("status"), manifest.get("stopped") or {}
    if status not in ("failed", "interrupted"):  # a complete run, or this run's own report at its end
        return []
    where = f" in stage {stopped['stage']}" if stopped.get("stage") else ""
    where = where or (f" after stage {stopped['after']}" if stopped.get("after") else "")
    error = f": {stopped['error']}" if stopped.get("error") else ""
    return [("Status", f"{status}{where}{error}")]


def _inputs(manifest) -> list[tuple[str, str]]:
    inputs = (manifest or {}).get("inputs") or {}
    rows = [("Model", inputs["model"])] if inputs.get("model") else []
    for name, label in (("data", "Data"), ("dpo_data", "DPO data")):
        if inputs.get(name):
            rows.append((label, f"{inputs[name]['source']} (sha256 {inputs[name]['sha256'][:12]}…)"))
    return rows


def _score_figure(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _figures(data: dict, entries: list[dict], judged: str | None) -> list[tuple[str, str]]:
    manifest, losses, summary, dpo = (
        data["manifest.json"],
        data["losses.json"],
        data["summary.json"],
        data["dpo/losses.json"],
    )
    figures = [("Run", (manifest or {}).get("run_id", "")), *_status(manifest), *_inputs(manifest)]
    figures.append(("Test entries", str(len(entries)) if entries else "none yet (no responses)"))
    if losses:
        figures += _training(losses, data["model/config.json"])
    elif data["checkpoint"]:
        name, history = data["checkpoint"]
        said = f"the finetune stage did not complete: its evaluations so far, from checkpoints/{name}"
        figures += [("Loss history", said), *_training(history, None)]
    if dpo:
        margin = dpo[-1]["val_chosen_reward"] - dpo[-1]["val_rejected_reward"]
        figures += [
            ("DPO evaluations", str(len(dpo))),
            ("DPO first / last validation loss", f"{dpo[0]['val_loss']:.3f} / {dpo[-1]['val_loss']:.3f}"),
            ("DPO last validation reward margin", f"{margin:.3f}"),
            *_trained(data["dpo/model/config.json"], "DPO tokens and steps trained"),
        ]
    if summary:
        figures += [
            ("Judge", f"{summary['judge_model']} ({summary['judge_backend']})"),
            ("Scored", f"{summary['scored']} of {summary['entries']} ({summary['unparsed']} unparsed)"),
            ("Mean / median score", f"{_score_figure(summary['mean'])} / {_score_figure(summary['median'])}"),
        ]
    elif judged:
        figures.append(("Judge", judged))
    return figures


def _judged(data: dict) -> str | None:
    """Why there are no scores, where the run says: the judge skipped, or not run yet."""
    if data["summary.json"]:
        return None
    if (data["config.yaml"] or {}).get("skip_judge") is True:
        return "The judge was skipped (--skip-judge): no scores."
    return "No scores yet: the judge stage has not completed."


def _stages(manifest) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(s.get('status', '')))}</td>"
        f'<td class="num">{_seconds(s)}</td><td>{html.escape(str(s.get("error") or ""))}</td></tr>'
        for name, s in (manifest or {}).get("stages", {}).items()
    )
    return f'<table id="stages"><tr><th>Stage</th><th>Status</th><th>Seconds</th><th>Error</th></tr>{rows}</table>'


def _export(manifest) -> str:
    """The files of run --export, as the manifest records them, and how Ollama takes them."""
    stage = ((manifest or {}).get("stages") or {}).get("export") or {}
    files = stage.get("artifacts") or {}
    if stage.get("status") != "complete" or not isinstance(files, dict) or not files:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(meta.get('size')))}</td>"
        f"<td><code>{html.escape(str(meta.get('sha256')))}</code></td></tr>"
        for key, meta in files.items()
        if isinstance(meta, dict)
    )
    how = "cd export && ollama create MODEL -f Modelfile && ollama run MODEL"
    head = "<tr><th>File</th><th>Bytes</th><th>sha256</th></tr>"
    return f'<h2>Export</h2><table id="export">{head}{rows}</table><pre>{how}</pre>'


def _seconds(stage: dict) -> str:
    """A stage's seconds: as recorded, else from its start and end (a failed stage of an older run)."""
    if stage.get("duration_s") is not None:
        return str(stage["duration_s"])
    try:
        return str((datetime.fromisoformat(stage["end"]) - datetime.fromisoformat(stage["start"])).total_seconds())
    except (KeyError, TypeError, ValueError):
        return ""


def untrusted_inputs(folder: Path, manifest) -> dict[str, str]:
    """The report's inputs that the manifest records as artifacts but that are gone or differ from
    its sha256 (edited, truncated or copied from another run), each with what is wrong."""
    recorded = {
        key: meta["sha256"]
        for stage in ((manifest or {}).get("stages") or {}).values()
        for key, meta in (stage.get("artifacts") or {}).items()
    }
    problems = {}
    for name in INPUTS + DPO_INPUTS:
        if name not in recorded:
            continue
        if not (folder / name).is_file():
            problems[name] = "missing"
        elif sha256_file(folder / name) != recorded[name]:
            problems[name] = "changed since the run recorded it"
    for name, problem in problems.items():
        log.warning("report_input_untrusted", file=name, problem=problem)
    return problems


def _warnings(problems: dict[str, str]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{html.escape(name)}: {html.escape(p)}</li>" for name, p in problems.items())
    return (
        '<div class="warnings" id="warnings"><p>Warning: files of this run differ from what its manifest records, '
        f"so what is shown from them may not be the run's:</p><ul>{items}</ul></div>"
    )


def _no_plots(manifest, checkpoint) -> str:
    """Why there is nothing to draw: training stopped before it wrote its loss history, or has not run."""
    finetune = ((manifest or {}).get("stages") or {}).get("finetune") or {}
    if finetune.get("status") in ("failed", "interrupted"):
        where = "the figures above, from" if checkpoint else "in"
        return (
            f"<p>No loss plot: the finetune stage was {finetune['status']} before its end, where losses.json and "
            f"the plot are written (its evaluations so far are {where} the run's last checkpoint; a rerun resumes "
            "from it).</p>"
        )
    return "<p>No loss history or scores yet.</p>"


def checkpoint_history(folder: Path) -> tuple[str, list[dict]] | None:
    """An unfinished finetune's evaluations so far: the history in the run's last local checkpoint (a
    run read from a bucket has none here), or None where there is none to read."""
    checkpoints = checkpoint_dirs(folder / "checkpoints")
    if not checkpoints:
        return None
    what = f"checkpoints/{checkpoints[-1].name}/trainer_state.json"
    try:
        state = load_json(read_bounded(checkpoints[-1] / "trainer_state.json", MAX_JSON_BYTES, what), what)
        validated(TrainStateFile, state, what)
    except (OSError, ParseError) as exc:
        log.warning("report_checkpoint_unreadable", file=what, error=str(exc))
        return None
    return (checkpoints[-1].name, state["history"]) if state["history"] else None


def _plot(data: bytes, title: str) -> str:
    return f"<figure>{_png(data, title)}<figcaption>{html.escape(title)}</figcaption></figure>"


def render(folder: Path) -> str:
    """The report's HTML from the run files found in ``folder`` (sections without their files say so)."""
    data = {name: _read(folder, name) for name in INPUTS + DPO_INPUTS}
    problems = untrusted_inputs(folder, data["manifest.json"])
    data["checkpoint"] = None if data["losses.json"] else checkpoint_history(folder)
    entries = data["scores.json"] or data[RESPONSES_FILE] or []
    scores = [e["score"] for e in entries if e.get("score") is not None]
    shown = (
        ("loss-plot.png", "Finetune loss: training and validation"),
        ("dpo/loss-plot.png", "DPO loss: training and validation"),
        ("dpo/reward-margins-plot.png", "DPO reward margins: training and validation"),
    )
    plots = [_plot(data[name], title) for name, title in shown if data[name]]
    if scores:
        plots.append(_plot(score_histogram(scores), HISTOGRAM_TITLE))
    judged, marks = _judged(data), _marks(entries)
    figures = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _figures(data, entries, judged)
    )
    config = yaml.safe_dump(data["config.yaml"], sort_keys=False) if data["config.yaml"] else "(no config.yaml)"
    title = f"sft-job run {html.escape(str((data['manifest.json'] or {}).get('run_id', folder.name)))}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>
<body><h1>{title}</h1>{_warnings(problems)}
<h2>Figures</h2><table class="figures">{figures}</table>
<h2>Plots</h2><div class="plots">{"".join(plots) or _no_plots(data["manifest.json"], data["checkpoint"])}</div>
<h2>Stages</h2>{_stages(data["manifest.json"])}{_export(data["manifest.json"])}
{_side_by_side(data["sft/scores.json"] or data[f"sft/{RESPONSES_FILE}"] or [], entries)}
<h2>Responses and scores</h2>
{_caption(marks, judged) + _entries_table(entries, marks) if entries else "<p>No responses yet.</p>"}
<h2>Configuration</h2><pre>{html.escape(config)}</pre>
<script>{SCRIPT}</script>
</body></html>
"""


def fetch_inputs(storage: Storage, folder: Path) -> None:
    """The report's input files that ``storage`` holds and ``folder`` lacks, copied in. The names are
    fixed: no key read from the bucket becomes a path."""
    present = set(storage.list(""))
    for name in INPUTS + DPO_INPUTS:
        if name in present and not (folder / name).is_file():
            storage.get_file(name, folder / name)


def write_report(folder: Path, output: Path | None = None) -> Path:
    """``report.html`` (into ``folder`` unless ``output`` names another file), written atomically."""
    path = output or folder / REPORT
    atomic_write_text(path, render(folder))
    return path


def run_report(source: str, endpoint_url: str | None = None, output: str | None = None) -> str:
    """``sft-job report``: rebuild a run's report from its folder or its ``s3://`` prefix. The report
    goes back into the run (or to ``output``); returns where it was written."""
    if not source.strip():  # else the current folder, named as ""
        raise ConfigError("the run to report on is empty: give the folder or s3:// prefix of one run")
    storage = open_storage(source, endpoint_url)
    if isinstance(storage, LocalStorage) and not storage.root.is_dir():
        what = "is not a folder" if storage.root.exists() else "does not exist"
        raise ConfigError(f"{source} {what}: give the folder or s3:// prefix of one run")
    if isinstance(storage, LocalStorage) and output is None and (storage.root / REPORT).is_dir():
        raise ConfigError(f"{storage.root / REPORT} is a folder: remove it, or write the report elsewhere (--output)")
    if not storage.get_text("manifest.json"):
        raise ConfigError(f"{source} holds no manifest.json: give the folder or s3:// prefix of one run")
    if isinstance(storage, LocalStorage):  # a local run folder: read in place
        path = write_report(storage.root, Path(output) if output else None)
        log.info("report_written", path=str(path))
        return str(path)
    with tempfile.TemporaryDirectory(prefix="sft-job-report-") as tmp:
        fetch_inputs(storage, Path(tmp))
        path = write_report(Path(tmp), Path(output) if output else None)
        if output is None:
            storage.put_file(path, REPORT)
            path = f"{storage.url}/{REPORT}"
    log.info("report_written", path=str(path))
    return str(path)
