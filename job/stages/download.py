"""The ``download`` stage: a named model's weights, its tokenizer and (optionally) the book's dataset into the
cache. Where each file comes from is ``job/models/hub.py``'s (a model's) and ``job/data/instructions.py``'s (a
dataset's); fetching it, ``job/storage/fetch.py``'s."""

from __future__ import annotations

from pathlib import Path

from job.core.observability import Metrics, get_logger
from job.data.instructions import dataset_file
from job.models.hub import fetch_model, model_downloader, tokenizer_files
from job.models.registry import model_entry
from job.stages.download_config import DownloadConfig

log = get_logger(__name__)


def run_download(cfg: DownloadConfig, metrics: Metrics | None = None) -> Path:
    """The stage; returns the model's folder in the cache."""
    downloader = model_downloader(cfg, metrics, cfg.download_attempts)
    carried = model_entry(cfg.model).tokenizer == "carried"
    files = [] if carried else tokenizer_files(cfg.base_url)  # a hub model carries its own
    if cfg.dataset:
        files.append(dataset_file(base_url=cfg.base_url))
    log.info("download_start", model=cfg.model, source=cfg.source, cache=str(cfg.cache), files=len(files))
    downloader.fetch_all(files)
    target = fetch_model(cfg, downloader)
    log.info("download_complete", model_dir=str(target))
    return target
