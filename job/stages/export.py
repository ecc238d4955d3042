"""The export stage: a model folder as ``model.gguf`` (job/models/gguf_export.py) and an Ollama ``Modelfile``
beside it whose ``TEMPLATE`` renders the prompt the model was trained on (job/data/chat_layout.py), with its
end token as ``stop`` and the job's generation defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

from job.core.errors import ConfigError
from job.core.observability import Metrics, get_logger
from job.data.chat_layout import TurnLayout, dropped_by_modelfile_parser, turn_layout
from job.data.formats import FORMATS
from job.data.instructions import ChatStyle, prompt_style
from job.models.families import load_model, model_tokenizer
from job.models.gguf_export import write_gguf
from job.models.gguf_vocab import Vocabulary, byte_vocabulary, gpt2_vocabulary, hf_vocabulary
from job.models.gpt2_weights import WeightsError, recorded_settings
from job.models.tokenizer import END_OF_TEXT, ByteTokenizer, HFTokenizer
from job.stages.export_config import ExportConfig
from job.stages.generate import saved_prompt_style
from job.storage.store import atomic_write_text

log = get_logger(__name__)
GGUF_FILE, MODELFILE = "model.gguf", "Modelfile"
# Ollama allocates the whole context's KV cache up front: a model made for 128k tokens gets this many.
MAX_NUM_CTX = 8192


def vocabulary(model_dir: Path, tokenizer, cache: Path) -> Vocabulary:
    """The tokenizer the model was trained with, as GGUF holds it."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_vocabulary()
    if isinstance(tokenizer, HFTokenizer):
        return hf_vocabulary(model_dir, tokenizer)
    return gpt2_vocabulary(cache / "gpt2")


def end_text(tokenizer) -> str:
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer.id_to_token(tokenizer.end_id)
    return END_OF_TEXT


# Ollama's Modelfile parser (parser/parser.go) has no escapes: a value in triple quotes is read as is, backslashes
# and quotes included, and ends at the first line end where the text before it, less trailing blanks, ends in """.
CLOSES_EARLY = re.compile(r'"""[ \t\r\n]*[\r\n]')


def unwritable_system(text: str) -> str | None:
    """Why ``text`` cannot be a Modelfile's ``SYSTEM`` that Ollama reads back as it is, or None."""
    if not text:
        return "it is empty, and Ollama sends no system message for an empty SYSTEM"
    if CLOSES_EARLY.search(text):
        return 'it holds """ before a line end, where Ollama\'s Modelfile parser would end the SYSTEM text'
    dropped = sorted({f"U+{ord(c):04X}" for c in text if dropped_by_modelfile_parser(c)})
    if dropped:
        return f"it holds characters Ollama's Modelfile parser drops ({', '.join(dropped[:5])})"
    return None


def modelfile(layout: TurnLayout, stop: str, num_ctx: int, cfg: ExportConfig, system: str | None = None) -> str:
    """Ollama's Modelfile: the GGUF beside it, the layout as its TEMPLATE, the trained ``system`` prompt as its
    SYSTEM (the system message of a chat that sends none; ``unwritable_system`` must pass it), the end token as
    ``stop``, and the job's decoding (greedy at temperature 0; no top-p, min-p or repeat penalty, which the job
    does not apply)."""
    lines = [
        f"FROM ./{GGUF_FILE}",
        f'TEMPLATE """{layout.go_template()}"""',
        *([f'SYSTEM """{system}"""'] if system is not None else []),
        f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}",
        f"PARAMETER num_ctx {num_ctx}",
        f"PARAMETER num_predict {cfg.max_new_tokens}",
        f"PARAMETER temperature {cfg.temperature:g}",
        f"PARAMETER top_k {cfg.top_k or 0}",
        "PARAMETER top_p 1",
        "PARAMETER min_p 0",
        "PARAMETER repeat_penalty 1",
        f"PARAMETER seed {cfg.seed}",
    ]
    return "\n".join(lines) + "\n"


# A run folder's models, the last trained first (run --export exports DPO's where there is one).
RUN_MODELS = (("dpo/model", "its DPO model"), ("model", "its finetuned model"))


def _not_a_model(model_dir: Path) -> None:
    if (model_dir / "config.json").is_file() or (model_dir / "hparams.json").is_file():
        return
    found = [f"{model_dir / sub} ({what})" for sub, what in RUN_MODELS if (model_dir / sub / "config.json").is_file()]
    if found:  # a run's folder (a LoRA run's model/ is the merged model)
        raise WeightsError(f"{model_dir} is a run's folder, not a model's: give --model-dir {' or '.join(found)}")
    raise WeightsError(f"{model_dir} is not a model folder: it has no config.json (nor hparams.json)")


def check_exportable(folder: Path | None, tokenizer, style, cache: Path, template: str | None = None) -> list[str]:
    """What the export would refuse, known before any training (``run --export``'s preflight): the tokenizer as
    GGUF holds it and the prompt layout as a Go template. ``folder`` holds the tokenizer's files (None for GPT-2's
    and the smoke's). Returns what the export will warn of (``template``: the chat template's source the trained
    model will carry)."""
    try:
        layout = turn_layout(style, end_text(tokenizer))
        vocabulary(folder, tokenizer, cache)
    except ConfigError as exc:
        raise ConfigError(f"--export gguf: {exc}") from None
    return _caveats(layout, style, template)


def export_style_name(named: str | None, model_dir: Path) -> str:
    """The prompt layout the Modelfile writes: ``--prompt-style``, else the one the model recorded (alpaca where
    it recorded none: a model from before the record). A model trained on text (or prompt-completion text) had
    no layout at all: writing Alpaca's would be a guess, so it is exit 2 unless --prompt-style names one."""
    if named:
        return named
    recorded = recorded_settings(model_dir)
    if "prompt_style" in recorded and recorded["prompt_style"] is None:
        # the record keeps the format beside the style (a config.json from elsewhere may hold anything there)
        trained_on = recorded.get("data_format") if recorded.get("data_format") in FORMATS else "text"
        raise ConfigError(
            f"{model_dir} was trained on {trained_on} data, which has no prompt layout (no chat template) for the "
            "Modelfile's TEMPLATE: name the one to write with --prompt-style alpaca, phi3 or chat"
        )
    return saved_prompt_style(model_dir) or "alpaca"


def trained_system_prompt(model_dir: Path, style_name: str) -> str | None:
    """The system prompt every training conversation began with, as the model recorded it, where the Modelfile
    writes the layout it was trained on (not another --prompt-style) and its SYSTEM can hold the text; where it
    cannot, a ``modelfile_system_unwritten`` warning says why."""
    recorded = recorded_settings(model_dir)
    system = recorded.get("system_prompt")
    if not isinstance(system, str) or style_name != recorded.get("prompt_style"):
        return None
    why = unwritable_system(system)
    if why is not None:
        log.warning(
            "modelfile_system_unwritten",
            why=f"the system prompt every training conversation began with cannot be the Modelfile's SYSTEM: {why}; "
            "send it as each chat's system message",
            model_dir=str(model_dir),
        )
        return None
    return system


def _caveats(layout: TurnLayout, style, template: str | None) -> list[str]:
    """What the Modelfile's TEMPLATE renders otherwise than the model's template (``template``'s source), said
    rather than fixed."""
    caveats = list(layout.caveats)
    if isinstance(style, ChatStyle) and template and "strftime_now" in template:
        caveats.append(
            "the model's chat template writes the day's date (strftime_now): the TEMPLATE holds the export's day"
        )
    return caveats


def run_export(cfg: ExportConfig, metrics: Metrics | None = None) -> Path:
    """``model.gguf`` and ``Modelfile`` in ``cfg.output``; returns the folder."""
    model_dir, output, cache = Path(cfg.model_dir), Path(cfg.output), Path(cfg.cache)
    _not_a_model(model_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is not a folder")
    for target in (output / GGUF_FILE, output / MODELFILE):  # both, before either is written
        if target.exists() and not target.is_file():
            raise ConfigError(f"--output {output}: {target} is there and is not a file (a folder?): move it away")
    tokenizer = model_tokenizer(model_dir, cache, cfg.base_url)
    style_name = export_style_name(cfg.prompt_style, model_dir)
    style = prompt_style(style_name, tokenizer)
    stop = end_text(tokenizer)
    layout = turn_layout(style, stop)
    template = getattr(tokenizer, "chat_template", None)  # GPT-2's has none
    template = template.source if template else None
    for caveat in _caveats(layout, style, template):
        log.warning("modelfile_template_inexact", why=caveat, model_dir=str(model_dir))
    # The GGUF's own template: the model's for chat, else the style's layout (llama.cpp's chat reads it).
    chat_template = tokenizer.chat_template.source if isinstance(style, ChatStyle) else layout.jinja_template()
    vocab = vocabulary(model_dir, tokenizer, cache)
    model = load_model(model_dir).eval()
    write_gguf(model, vocab, output / GGUF_FILE, cfg.dtype, chat_template, model_dir.name)
    num_ctx = min(model.cfg.context_length, MAX_NUM_CTX)
    system = trained_system_prompt(model_dir, style_name)
    atomic_write_text(output / MODELFILE, modelfile(layout, stop, num_ctx, cfg, system))
    log.info("exported", model_dir=str(model_dir), output=str(output), dtype=cfg.dtype, prompt_style=style.name)
    return output
