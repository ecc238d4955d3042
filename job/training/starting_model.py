"""Where finetune and DPO take their starting model from: --model-dir, else the named model, fetched into
the cache where missing (the download stage's files), with its tokenizer. What the two stages share beyond
that is ``job/training/stage_io.py``'s."""

from __future__ import annotations

from pathlib import Path

from job.models.families import model_tokenizer
from job.models.hub import cached_model_dir, fetch_model, hf_repo_id, model_downloader, tokenizer_folder
from job.training.stage_io import StartingModel
from job.training.train_config import TrainConfig


def starting_model(cfg: TrainConfig) -> StartingModel:
    """The model a training stage on ``cfg`` starts from; nothing is fetched until it is asked for."""
    cached = cached_model_dir(cfg)
    folder = Path(cfg.model_dir) if cfg.model_dir else cached
    return StartingModel(
        folder=folder,
        hub_id=hf_repo_id(cfg.model) if folder == cached else None,
        fetch=lambda: folder if cfg.model_dir else fetch_model(cfg, model_downloader(cfg)),
        tokenizer=lambda: model_tokenizer(tokenizer_folder(cfg, cfg.model_dir), Path(cfg.cache), cfg.base_url),
    )
