"""The judge stage (book, 7.8): scores 0-100 from an LLM judge, concurrent, retried, restartable."""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from job.core import retry
from job.core.bounded_http import ReplyError, bounded_transport
from job.core.errors import ConfigError, JobError, TransientError
from job.core.observability import Metrics, Progress, get_logger, stderr_is_terminal
from job.core.parsing import ParseError, load_json, read_bounded, short, validated
from job.core.retry import Policy, Retried
from job.data.instructions import MAX_DATASET_BYTES, PROMPT_STYLES
from job.stages.judge_config import JudgeConfig
from job.storage.store import atomic_write_text, read_progress

log = get_logger(__name__)
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["score"],
}
PROGRESS_FILE = "scores.progress.jsonl"
# OpenAI's structured output, then the shape llama-cpp-python's server takes instead (it answers the first
# with HTTP 500): ``json_object`` with a ``schema``, which it compiles into a grammar.
OPENAI_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "score", "schema": SCORE_SCHEMA}}
SCHEMA_OBJECT_FORMAT = {"type": "json_object", "schema": SCORE_SCHEMA}
SHAPE_STATUSES = (400, 422, 500)  # how servers answer a request field they do not take


class JudgeError(JobError):
    """The judge cannot be used (not reachable, model missing); one line naming host and model."""


class StructuredRefused(JobError):
    """The server answers a plain request but refuses every structured request shape (exit 1, not 75)."""


class RetryableError(Exception):
    """A connection error, timeout or 5xx: worth another try (after ``retry_after`` seconds where the
    server said so); ``status`` is the HTTP status where there was one."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


class ErrorStatus(Exception):
    """An HTTP error status from the judge, with the reason its body gives (cut to one short line)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}")
        self.status, self.reason = status, reason


KEPT_REPLY_CHARS = 4096  # of a reply without a score: enough to see why, bounded in scores.json
CHAT_PATHS = ("/api/chat", "/chat/completions")  # the requests the reply bounds apply to
# The book's rule for a plain reply: the integer alone (whitespace and a final period allowed).
PLAIN_SCORE = re.compile(r"\s*([0-9]{1,3})\.?\s*", re.ASCII)


def judge_prompt(entry: dict, response_key: str = "model_response") -> str:
    """The book's request, word for word."""
    return (
        f"Given the input `{PROMPT_STYLES['alpaca'].format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[response_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def parse_score(reply: str, structured: bool) -> int | None:
    """The score a reply gives: an integer 0..100, or None (never raises).

    Structured: the JSON object's ``score``, a JSON integer (72.9, "72", true and 1e9 are no score); a
    reply that is not JSON at all (a server ignoring the schema) is read as plain. Plain: the book's
    instruction, "the integer number only": the reply is that integer, nothing else.
    """
    if structured:
        try:
            value = load_json(reply, "reply", max_depth=4)
        except ParseError:
            value = None
        if isinstance(value, dict):
            score = value.get("score")
            return score if isinstance(score, int) and not isinstance(score, bool) and 0 <= score <= 100 else None
    match = PLAIN_SCORE.fullmatch(reply)
    return int(match.group(1)) if match and int(match.group(1)) <= 100 else None


# --- backends -------------------------------------------------------------------------------


class JudgeBackend(Protocol):
    """What the stage needs of a judge server, whatever API it speaks."""

    host: str
    """The server's URL, for messages and the summary."""

    def ping(self) -> list[str]:
        """Model names the server has; raises RetryableError while it does not answer."""
        ...

    def ensure_model(self, allow_pull: bool) -> None:
        """Make sure the judge model is served (pulling it where the API can); JudgeError if not."""
        ...

    def ask(self, prompt: str) -> str:
        """The judge's reply text; RetryableError for transient failures, JudgeError for the rest."""
        ...


class OllamaJudge:
    """Ollama's API through the official ``ollama`` client."""

    def __init__(self, cfg: JudgeConfig):
        import httpx

        self.cfg = cfg
        self.host = cfg.judge_url or os.environ.get("OLLAMA_HOST") or "http://localhost:11434"
        transport = bounded_transport(httpx, cfg.judge_timeout, CHAT_PATHS)
        try:  # the ollama package makes a client from OLLAMA_HOST as it is imported
            import ollama

            self.client = ollama.Client(
                host=self.host,
                timeout=cfg.judge_timeout,
                transport=transport,
                # The client reads an error body's "error" with .get(): a body that is no JSON object
                # would raise AttributeError in it, so error statuses are read here, before it sees them.
                event_hooks={"response": [_raise_error_status]},
            )
        except ValueError:  # OLLAMA_HOST is read as it is: --judge-url is checked with the other options
            raise ConfigError(f"OLLAMA_HOST {short(os.environ.get('OLLAMA_HOST'))} is not a host or URL") from None
        self.options = {"seed": cfg.judge_seed, "temperature": cfg.judge_temperature, "num_ctx": cfg.judge_num_ctx}

    def ping(self) -> list[str]:
        """Model names the server has; raises RetryableError while it does not answer."""
        return [m.model for m in self._call(self.client.list).models if m.model is not None]

    def ensure_model(self, allow_pull: bool) -> None:
        names = self.ping()
        model = self.cfg.judge_model
        if model in names or f"{model}:latest" in names:
            return
        if not allow_pull:
            raise JudgeError(f"judge model {model!r} is not on {self.host} and --no-judge-pull was given")
        log.info("judge_pull_start", model=model, host=self.host)
        try:
            self._call(self._pull, model)  # the stream is read inside _call: its lines are replies too
        except JudgeError as exc:
            raise JudgeError(f"pulling judge model {model!r} on {self.host}: {exc}") from None
        log.info("judge_pull_done", model=model)

    def _pull(self, model: str) -> None:
        """Follow the pull's progress stream to its end, which must say "success"."""
        bar, status = None, None
        try:
            for progress in self.client.pull(model, stream=True):
                status = progress.status
                if progress.total and stderr_is_terminal():
                    from tqdm import tqdm

                    bar = bar or tqdm(total=progress.total, unit="B", unit_scale=True, desc=f"pull {model}")
                    bar.n = progress.completed or 0
                    bar.refresh()
                else:
                    log.info("judge_pull_progress", status=status, completed=progress.completed, total=progress.total)
        finally:
            if bar is not None:
                bar.close()
        if status != "success":  # a stream cut short: the model may not be there
            raise RetryableError(f"the pull of {model} ended without success (last status {short(status)})")

    def ask(self, prompt: str) -> str:
        kwargs = {"format": SCORE_SCHEMA} if self.cfg.judge_format == "structured" else {}
        reply = self._call(
            self.client.chat,
            model=self.cfg.judge_model,
            messages=[{"role": "user", "content": prompt}],
            options=self.options,
            **kwargs,
        )
        return reply.message.content or ""

    @staticmethod
    def _call(fn, *args, **kwargs):
        import httpx
        import ollama

        try:
            return fn(*args, **kwargs)
        except ReplyError as exc:  # too large, too slow, or asked to come back later
            raise RetryableError(str(exc), exc.retry_after) from None
        except ErrorStatus as exc:
            raise _status_error(exc.status, exc.reason) from None
        except ollama.ResponseError as exc:  # an {"error": ...} line of a stream: the server refuses
            raise JudgeError(f"judge refused: {_one_line(exc.error)}") from None
        except (ConnectionError, httpx.TransportError) as exc:  # the client's own text is a paragraph
            raise RetryableError(type(exc).__name__) from None
        # A 200 whose body is not JSON, nested too deep for json.loads, not an object (the client does
        # cls(**body) and part.get) or not the reply asked for: a failed request.
        except (ValueError, RecursionError, TypeError, AttributeError) as exc:
            raise RetryableError(_unreadable(exc)) from None


class OpenAIJudge:
    """An OpenAI-compatible chat API (vLLM, llama.cpp's server, Ollama's /v1, hosted APIs)."""

    def __init__(self, cfg: JudgeConfig):
        import httpx2
        import openai

        self.cfg = cfg
        self.host = cfg.judge_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        api_key = cfg.judge_api_key or _key_from_file(cfg.judge_api_key_file) or os.environ.get("OPENAI_API_KEY")
        # Retries are ours (same policy for both backends), so the client's own are off.
        http = httpx2.Client(transport=bounded_transport(httpx2, cfg.judge_timeout, CHAT_PATHS))
        try:
            self.client = openai.OpenAI(
                base_url=self.host,
                api_key=api_key or "unused",
                timeout=cfg.judge_timeout,
                max_retries=0,
                http_client=http,
            )
        except (ValueError, httpx2.InvalidURL):  # OPENAI_BASE_URL as it is; --judge-url is checked with the options
            raise ConfigError(f"judge URL {short(self.host)} is not a URL") from None
        self._shape: dict | None = None  # the structured response_format the server took
        self._refusal: StructuredRefused | None = None
        self._lock = threading.Lock()

    def ping(self) -> list[str]:
        return self._call(lambda: [m.id for m in validated(_ModelList, self.client.models.list(), UNREADABLE).data])

    def ensure_model(self, allow_pull: bool) -> None:
        names = self.ping()
        if self.cfg.judge_model not in names and f"{self.cfg.judge_model}:latest" not in names:
            raise JudgeError(f"judge model {self.cfg.judge_model!r} is not served by {self.host}")

    def ask(self, prompt: str) -> str:
        if self.cfg.judge_format == "plain":
            return self._complete(prompt, None)
        if self._refusal is not None:
            raise self._refusal
        shape = self._shape or OPENAI_SCHEMA_FORMAT
        try:
            reply = self._complete(prompt, shape)
        except (RetryableError, JudgeError) as exc:
            if self._shape is not None or _status_of(exc) not in SHAPE_STATUSES:
                raise
            return self._other_shape(prompt, exc)
        self._shape = shape  # a server that took it once takes it: later errors are outages
        return reply

    def _other_shape(self, prompt: str, refused: Exception) -> str:
        """OpenAI's ``json_schema`` was answered with an error status: try llama.cpp's ``json_object`` with a
        schema; where that fails too but a plain request is answered and ``json_schema`` fails again the same
        way, the server refuses structured output (exit 1: rerunning cannot help). Else an outage, retried."""
        with self._lock:  # one request finds the shape; the others wait for it
            if self._refusal is not None:
                raise self._refusal
            if self._shape is not None:
                return self._complete(prompt, self._shape)
            try:
                reply = self._complete(prompt, SCHEMA_OBJECT_FORMAT)
            except (RetryableError, JudgeError) as exc:
                if _status_of(exc) not in SHAPE_STATUSES or not self._refuses_again(prompt, refused):
                    raise refused from None
                self._refusal = StructuredRefused(
                    f"judge at {self.host} answers plain requests but refuses structured output "
                    f"(response_format json_schema: {_one_line(refused, 120)}; "
                    f"json_object with a schema: {_one_line(exc, 120)}): "
                    "use --judge-format plain"
                )
                raise self._refusal from None
            self._shape = SCHEMA_OBJECT_FORMAT
            log.info("judge_response_format", host=self.host, response_format="json_object with a schema")
            return reply

    def _refuses_again(self, prompt: str, refused: Exception) -> bool:
        """Whether a plain request is answered and ``json_schema`` then fails exactly as it did."""
        try:
            self._complete(prompt, None)
        except (RetryableError, JudgeError):
            return False  # plain fails too: the server is failing, not the shape
        try:
            self._complete(prompt, OPENAI_SCHEMA_FORMAT)
        except (RetryableError, JudgeError) as again:
            return str(again) == str(refused)
        return False

    def _complete(self, prompt: str, response_format: dict | None) -> str:
        extra = {"response_format": response_format} if response_format is not None else {}
        reply = self._call(
            self.client.chat.completions.create,
            model=self.cfg.judge_model,
            messages=[{"role": "user", "content": prompt}],
            temperature=self.cfg.judge_temperature,
            seed=self.cfg.judge_seed,
            **extra,
        )
        # The client builds its reply objects without checking them: the fields read are checked here.
        return self._call(validated, _Completion, reply, UNREADABLE).choices[0].message.content or ""

    @staticmethod
    def _call(fn, *args, **kwargs):
        import openai

        try:
            return fn(*args, **kwargs)
        except ReplyError as exc:  # raised while the client reads the body
            raise RetryableError(str(exc), exc.retry_after) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            cause = exc.__cause__
            if isinstance(cause, ReplyError):  # the client wraps what the transport raised
                raise RetryableError(str(cause), cause.retry_after) from None
            raise RetryableError(f"{type(exc).__name__}") from None
        except ParseError as exc:  # a field read that is missing or of another type; the value found is
            raise RetryableError(_one_line(exc, 300)) from None  # a repr whose field names may hold newlines
        except (openai.APIResponseValidationError, ValueError, RecursionError, AttributeError) as exc:  # not a reply
            raise RetryableError(_unreadable(exc)) from None
        except openai.APIStatusError as exc:
            raise _status_error(exc.status_code, exc.message) from None


UNREADABLE = "unreadable reply"


class _Read(BaseModel):
    """The fields of a reply the job reads: checked strictly, whatever else the reply holds."""

    model_config = ConfigDict(from_attributes=True, strict=True)


class _Message(_Read):
    content: str | None = None  # null (a tool call, a refusal) is a reply without a score


class _Choice(_Read):
    message: _Message


class _Completion(_Read):
    choices: list[_Choice] = Field(min_length=1)


class _ModelId(_Read):
    id: str


class _ModelList(_Read):
    data: list[_ModelId]


def _raise_error_status(response) -> None:
    """An httpx response hook: an error status is an ErrorStatus with its body's reason."""
    if response.status_code < 400:
        return
    response.read()
    try:
        body: Any = json.loads(response.text)
    except (ValueError, RecursionError):
        body = None
    reason = body.get("error") if isinstance(body, dict) else None
    raise ErrorStatus(response.status_code, _one_line(reason if reason is not None else response.text))


def _status_error(status: int, reason: str) -> Exception:
    """A 5xx or 429 is worth another try; any other error status is the judge refusing the request."""
    if status >= 500 or status == 429:
        return RetryableError(f"HTTP {status}: {_one_line(reason)}", status=status)
    refusal = JudgeError(f"judge answered HTTP {status}: {_one_line(reason)}")
    refusal.status = status
    return refusal


def _status_of(exc: Exception) -> int | None:
    """The HTTP status an error came with, or None (a connection error, a timeout, an unreadable reply)."""
    return getattr(exc, "status", None)


def _one_line(text: Any, limit: int = 200) -> str:
    """A server's text as one line of at most ``limit`` characters (it goes into the error line)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unreadable(exc: Exception) -> str:
    """What a client library found wrong in a reply: the field and problem where pydantic says."""
    import pydantic

    if isinstance(exc, pydantic.ValidationError) and exc.errors():
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "the reply"
        return f"{UNREADABLE}: {where}: {error['msg']}"
    return f"{UNREADABLE} ({type(exc).__name__})"


def _key_from_file(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return read_bounded(path, 64 << 10, f"--judge-api-key-file {path}").decode().strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        raise JudgeError(f"--judge-api-key-file {path}: {getattr(exc, 'strerror', None) or 'not text'}") from None


def make_judge(cfg: JudgeConfig) -> JudgeBackend:
    return OllamaJudge(cfg) if cfg.judge_backend == "ollama" else OpenAIJudge(cfg)


def preflight(cfg: JudgeConfig, judge: JudgeBackend | None = None, sleep=time.sleep) -> JudgeBackend:
    """Wait for the server (up to ``--judge-wait``), then make sure the model is there."""
    judge = judge or make_judge(cfg)
    hint = "start it, point --judge-url (or OLLAMA_HOST) at it, or pass --skip-judge"
    said: list[float] = []  # when the wait was last logged: at once, then every 30 s

    def on_retry(last: Retried) -> None:
        if not said:
            log.warning("judge_not_answering", host=judge.host, error=last.reason, waiting=cfg.judge_wait, hint=hint)
        elif time.monotonic() - said[-1] >= 30:
            log.info("judge_waiting", host=judge.host, error=last.reason, tries=last.tries)
        else:
            return
        said.append(time.monotonic())

    def give_up(last: Retried) -> TransientError:
        return TransientError(f"judge at {judge.host} did not answer within {cfg.judge_wait} ({last.reason}): {hint}")

    policy = Policy(first_s=0.25, cap_s=5.0, within_s=cfg.judge_wait_seconds)
    retry.call(judge.ping, policy, _retryable, give_up, on_retry, sleep)

    def checking_failed(last: Retried) -> TransientError:
        return TransientError(f"judge at {judge.host} failed while checking model {cfg.judge_model} ({last.reason})")

    attempts = Policy(first_s=0.5, cap_s=30.0, attempts=cfg.judge_retries + 1)
    retry.call(lambda: judge.ensure_model(cfg.judge_pull), attempts, _retryable, checking_failed, None, sleep)
    log.info("judge_ready", host=judge.host, model=cfg.judge_model, backend=cfg.judge_backend)
    return judge


def _retryable(exc: BaseException) -> str | None:
    return str(exc) if isinstance(exc, RetryableError) else None


# --- scoring --------------------------------------------------------------------------------


@dataclass
class Scored:
    index: int
    score: int | None
    judge_reply: str | None
    outcome: str  # "ok", "unparsed", "failed" (retries spent) or "refused" (4xx)
    error: str | None = None


def score_one(
    judge: JudgeBackend, cfg: JudgeConfig, index: int, entry: dict, metrics: Metrics, sleep=time.sleep
) -> Scored:
    """One entry: asked with the retry policy on transient errors; never raises JobError."""
    prompt = judge_prompt(entry, cfg.response_key)

    def on_retry(last: Retried) -> None:
        metrics.judge_requests_total.labels(outcome="retry").inc()

    policy = Policy(first_s=0.5, cap_s=30.0, attempts=cfg.judge_retries + 1)
    try:
        reply = retry.call(lambda: judge.ask(prompt), policy, _retryable, _RetriesSpent, on_retry, sleep)
    except _RetriesSpent as spent:
        return Scored(index, None, None, "failed", spent.last.reason)
    except JudgeError as exc:  # 4xx: the request itself is wrong, so no retry
        return Scored(index, None, None, "refused", str(exc))
    score = parse_score(reply, cfg.judge_format == "structured")
    return Scored(index, score, reply[:KEPT_REPLY_CHARS], "ok" if score is not None else "unparsed")


class _RetriesSpent(Exception):
    def __init__(self, last: Retried):
        super().__init__(last.reason)
        self.last = last


def load_responses(path: Path, key: str) -> list[dict]:
    try:
        what = f"--responses {path}"
        entries = load_json(read_bounded(path, MAX_DATASET_BYTES, what), what, strict=True)
    except FileNotFoundError:
        raise JobError(f"--responses {path} does not exist") from None
    if not isinstance(entries, list) or not entries:
        raise JobError(f"--responses {path} must be a non-empty JSON array of entries")
    for i, entry in enumerate(entries):
        for name in ("instruction", "output", key):
            if not isinstance(entry, dict) or not isinstance(entry.get(name), str):
                raise JobError(f"--responses {path}: entry {i}: field {name!r} must be a string")
        entry.setdefault("input", "")
    return entries


def summarize(cfg: JudgeConfig, host: str, entries: list[dict], records: dict[int, dict]) -> dict:
    scores = [records[i]["score"] for i in range(len(entries)) if records[i]["score"] is not None]
    histogram = {f"{lo}-{lo + 9 if lo < 90 else 100}": 0 for lo in range(0, 100, 10)}
    for s in scores:
        lo = min(s // 10 * 10, 90)
        histogram[f"{lo}-{lo + 9 if lo < 90 else 100}"] += 1
    return {
        "judge_backend": cfg.judge_backend,
        "judge_host": host,
        "judge_model": cfg.judge_model,
        "options": {"seed": cfg.judge_seed, "temperature": cfg.judge_temperature, "num_ctx": cfg.judge_num_ctx},
        "prompt_mode": cfg.judge_format,
        "entries": len(entries),
        "scored": len(scores),
        "unparsed": sum(1 for r in records.values() if r["outcome"] == "unparsed"),
        "failed": 0,  # a summary is written only once every entry has a reply
        "mean": statistics.fmean(scores) if scores else None,
        "median": statistics.median(scores) if scores else None,
        "min": min(scores) if scores else None,
        "max": max(scores) if scores else None,
        "histogram": histogram,
    }


def run_judge(cfg: JudgeConfig, metrics: Metrics | None = None, judge: JudgeBackend | None = None) -> dict:
    metrics = metrics or Metrics()
    entries = load_responses(Path(cfg.responses), cfg.response_key)
    judge = preflight(cfg, judge)  # before any scoring: a dead server fails here, with nothing written
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    progress_path = output / PROGRESS_FILE
    records = {i: r for i, r in read_progress(progress_path).items() if _reply_record(r, len(entries))}
    todo = [i for i in range(len(entries)) if i not in records]
    log.info(
        "judge_start",
        entries=len(entries),
        already_scored=len(records),
        to_score=len(todo),
        model=cfg.judge_model,
        host=judge.host,
        mode=cfg.judge_format,
    )
    failures = _score_all(judge, cfg, entries, todo, records, progress_path, metrics)
    if failures:
        raise _incomplete(failures, len(entries), judge.host)
    scored = [
        {**e, "score": records[i]["score"], "judge_reply": records[i]["judge_reply"]} for i, e in enumerate(entries)
    ]
    summary = summarize(cfg, judge.host, entries, records)
    if summary["mean"] is not None:
        metrics.judge_score_mean.set(summary["mean"])
    atomic_write_text(output / "scores.json", json.dumps(scored, indent=4, allow_nan=False) + "\n")
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    progress_path.unlink()
    average = f"{summary['mean']:.2f}" if summary["mean"] is not None else "n/a"
    log.info(
        "judge_summary",
        message=f"Number of scores: {summary['scored']} of {len(entries)}; Average score: {average}",
        scored=summary["scored"],
        entries=len(entries),
        average=summary["mean"],
        unparsed=summary["unparsed"],
    )
    return summary


def _reply_record(record: dict, entries: int) -> bool:
    """A progress line that holds a reply (a failure recorded by an older version stays pending)."""
    score, reply = record.get("score"), record.get("judge_reply")
    return (
        0 <= record["index"] < entries
        and record.get("outcome") in ("ok", "unparsed")
        and (score is None or (type(score) is int and 0 <= score <= 100))
        and (reply is None or isinstance(reply, str))
    )


def _score_all(judge, cfg, entries, todo, records, progress_path, metrics) -> list[Scored]:
    """Ask for every entry in ``todo``; a reply (scored or not) is appended to the progress file and
    ``records``, a failed request is not: it stays pending for a rerun. Returns the failures."""
    failures, scores = [], [r["score"] for r in records.values() if r["score"] is not None]
    bar = Progress("judge", len(entries), len(records), "entry", metrics)
    pool = ThreadPoolExecutor(cfg.judge_concurrency)
    try:
        with open(progress_path, "a") as progress:
            futures = [pool.submit(score_one, judge, cfg, i, entries[i], metrics) for i in todo]
            for future in as_completed(futures):
                result = future.result()
                metrics.judge_requests_total.labels(outcome=result.outcome).inc()
                if result.outcome in ("failed", "refused"):
                    log.warning("judge_request_failed", index=result.index, outcome=result.outcome, error=result.error)
                    failures.append(result)
                    continue
                if result.score is not None:
                    metrics.judge_score.observe(result.score)
                    scores.append(result.score)
                else:
                    log.warning("judge_unparsed", index=result.index, reply=result.judge_reply)
                record = {k: getattr(result, k) for k in ("index", "score", "judge_reply", "outcome")}
                # Only this thread writes: the workers just ask, and results arrive here one by one.
                progress.write(json.dumps(record) + "\n")
                progress.flush()
                records[result.index] = record
                bar.update(1, mean_score=round(statistics.fmean(scores), 1) if scores else None)
    finally:  # on a stop signal the queued requests are dropped; those in flight end within --judge-timeout
        pool.shutdown(wait=False, cancel_futures=True)
    bar.close()
    return failures


def _incomplete(failures: list[Scored], total: int, host: str) -> JobError:
    """Entries without a reply: a refusal (4xx) needs a fix (exit 1); outages a rerun (exit 75)."""
    refused = [f for f in failures if f.outcome == "refused"]
    first = (refused or failures)[0].error
    what = f"judge: {len(failures)} of {total} entries failed ({first} from {host})"
    if refused:
        return JudgeError(f"{what}: the judge refuses the requests; check --judge-model and --judge-url")
    return TransientError(f"{what}: rerun to retry them (the {total - len(failures)} scored are kept)")
