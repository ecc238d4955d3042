"""How responses are decoded (``job/models/decoding.py`` decodes; ``generate`` and ``run`` take these)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.settings import Settings, positive, positive_if_set


class DecodingSettings(Settings):
    """How responses are decoded (shared by ``generate`` and ``run``)."""

    help_section: ClassVar[str] = "Generate"
    max_new_tokens: int = 256
    """Most tokens generated per response (the book's 256)."""
    temperature: float = 0.0
    """0 is greedy (the book's); above 0 samples from the softened distribution."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    limit: int | None = None
    """Answer only the first N test entries (smoke runs)."""
    eos_check_every: int | None = None
    """Greedy decoding with each batch's shape fixed: finished rows stay in (masked) and the end is checked
    every N steps, not after each (the same tokens; for GPUs, off until measured there)."""

    @model_validator(mode="after")
    def _check_decoding(self):
        positive(self, "max_new_tokens")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.eos_check_every is not None and self.temperature > 0:
            raise ConfigError("eos_check_every needs greedy decoding (temperature 0)")
        positive_if_set(self, "top_k", "limit", "eos_check_every")
        return self
