"""``sft-job export``'s settings, and the run's ``--export`` that feeds them."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.settings import Settings, option, positive, positive_if_set, seed
from job.models.origin import DEFAULT_CACHE

ExportDtype = Literal["f32", "f16", "bf16", "q8_0"]


class ExportConfig(Settings):
    """``sft-job export``: a model folder as one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama
    Modelfile beside it."""

    help_section: ClassVar[str] = "Export"
    model_dir: str = "runs/finetune/model"
    """The model to export: a finetune or DPO stage's model/ folder (a LoRA run's is the merged model)."""
    output: str = option("runs/export", operational=True)
    """Folder model.gguf and Modelfile are written to."""
    format: Literal["gguf"] = "gguf"
    """File format (GGUF, llama.cpp's)."""
    dtype: ExportDtype = "f16"
    """Type of the weight matrices (norms, biases and rope factors stay f32): f32 as trained, f16 or bf16 half
    the size, q8_0 8-bit blocks (a little over a quarter)."""
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = None
    """The prompt layout the Modelfile's TEMPLATE renders: by default the one the model was finetuned with (saved
    in its config.json), else alpaca; chat is the model's own chat template."""
    cache: str = option(DEFAULT_CACHE, operational=True, section="Storage")
    """Folder that holds GPT-2's tokenizer files (a GPT-2 model's vocabulary and merges come from there)."""
    base_url: str | None = option(None, operational=True, section="Storage")
    """Mirror to fetch GPT-2's tokenizer files from where the cache lacks them."""
    max_new_tokens: int = 256
    """The Modelfile's num_predict: most tokens per answer (generate's default)."""
    temperature: float = 0.0
    """The Modelfile's temperature: 0 is greedy (generate's default)."""
    top_k: int | None = None
    """The Modelfile's top_k (none: all tokens, top_k 0)."""
    seed: int = 123
    """The Modelfile's sampling seed."""

    @model_validator(mode="after")
    def _check_export(self):
        positive(self, "max_new_tokens")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        positive_if_set(self, "top_k")
        seed(self, "seed")
        return self


class ExportSettings(Settings):
    """What ``sft-job run`` exports after training."""

    help_section: ClassVar[str] = "Run"
    export: Literal["gguf"] | None = option(None, operational=True, feeds=("export", "format"))
    """After training, write the model (DPO's with --dpo) as GGUF with an Ollama Modelfile into {run_id}/export/
    (sft-job export's files); a rerun may add it."""
    export_dtype: ExportDtype = option("f16", feeds=("export", "dtype"))
    """Type of the exported weight matrices (sft-job export's --dtype)."""
