"""``sft-job judge``'s settings, and the judge's settings that ``run`` shares."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from job.core.errors import ConfigError
from job.core.settings import Settings, check_url, option, parse_duration, positive, seed


class JudgeSettings(Settings):
    """The judge server and how it is asked (shared by ``judge`` and ``run``)."""

    help_section: ClassVar[str] = "Judge"
    judge_backend: Literal["ollama", "openai"] = "ollama"
    """Ollama's API through the ollama client, or an OpenAI-compatible chat API (vLLM, llama.cpp, hosted)."""
    judge_url: str | None = option(None, operational=True)
    """Judge server, an http(s):// URL; defaults to OLLAMA_HOST or http://localhost:11434 (ollama),
    OPENAI_BASE_URL (openai)."""
    judge_api_key: str | None = option(None, secret=True)
    """API key for the openai backend; defaults to OPENAI_API_KEY. Prefer the variable or --judge-api-key-file:
    a flag shows in the process list."""
    judge_api_key_file: str | None = option(None, operational=True)
    """File holding the judge's API key (a Kubernetes Secret mounted as a file); read when the judge is asked."""
    judge_model: str = "llama3"
    """Judge model tag (the book's llama3; any tag works)."""
    judge_format: Literal["structured", "plain"] = "structured"
    """structured asks for JSON {"score": int} by schema; plain sends the book's request and parses the integer."""
    judge_seed: int = 123
    """Sampling seed sent to the judge (the book's)."""
    judge_temperature: float = 0.0
    """Judge temperature (the book's 0)."""
    judge_num_ctx: int = 2048
    """Judge context window, Ollama's num_ctx (the book's)."""
    judge_concurrency: int = option(4, operational=True)
    """Requests in flight at once."""
    judge_timeout: float = option(120.0, operational=True)
    """Seconds one request may take before it counts as failed (and is retried)."""
    judge_retries: int = option(4, operational=True)
    """Retries of a request after connection errors, timeouts and 5xx answers (exponential backoff, jitter)."""
    judge_wait: str = option("300s", operational=True)
    """How long to wait for the judge server to answer at start (the sidecar may start after the job)."""
    judge_pull: bool = option(True, operational=True)
    """Pull the judge model when the server lacks it (ollama backend)."""

    @model_validator(mode="after")
    def _check_judge(self):
        positive(self, "judge_concurrency", "judge_timeout", "judge_num_ctx")
        seed(self, "judge_seed")
        check_url("judge_url", self.judge_url, ("http", "https"))
        if self.judge_timeout > 86400:
            raise ConfigError(f"judge_timeout must be at most 86400 seconds, got {self.judge_timeout}")
        if self.judge_retries < 0:
            raise ConfigError(f"judge_retries must be >= 0, got {self.judge_retries}")
        parse_duration(self.judge_wait, "judge_wait")
        return self

    @property
    def judge_wait_seconds(self) -> float:
        return parse_duration(self.judge_wait)


class JudgeConfig(JudgeSettings):
    """``sft-job judge``: LLM-as-judge scores 0-100 (book, 7.8) from Ollama or an OpenAI-compatible server."""

    responses: str = "runs/generate/instruction-data-with-response.json"
    """File of entries with responses to score, like the generate stage's output."""
    output: str = option("runs/judge", operational=True)
    """Folder scores.json and summary.json are written to."""
    response_key: str = "model_response"
    """Field of each entry that holds the response to score."""
