"""``sft-job download``'s settings."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator

from job.core.settings import positive
from job.models.origin import HubAccess, ModelOrigin


class DownloadConfig(ModelOrigin, HubAccess):
    """What ``sft-job download`` fetches, and from where."""

    help_section: ClassVar[str] = "Download"
    dataset: bool = True
    """Also fetch the book's instruction dataset into the cache."""
    download_attempts: int = 5
    """Tries per file for transient errors (dropped connections, 5xx); each resumes the partial file."""

    @model_validator(mode="after")
    def _check_download(self):
        positive(self, "download_attempts")
        return self
