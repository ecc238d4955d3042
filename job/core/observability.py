"""Structured logs (structlog, one JSON object per line) and the job's Prometheus metrics."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from structlog.tracebacks import ExceptionDictTransformer

from job.core.errors import ConfigError


class StageStatus(IntEnum):
    """Values of the ``sft_job_stage_status`` gauge (the Grafana dashboard maps them to words)."""

    PENDING = 0
    RUNNING = 1
    DONE = 2
    FAILED = 3


class RunStatus(IntEnum):
    """Values of the ``sft_job_run_status`` gauge: the run as its last process left it."""

    RUNNING = 1
    DONE = 2
    FAILED = 3  # exit 1, 2 or 70: a person must look
    RETRY = 4  # exit 75: stopped to be rerun (preempted, an outage); the state is kept


def configure_logging(log_format: str = "auto", level: str = "info", stream=None, log_file: str | None = None) -> None:
    """Events on stdout as JSON lines, a readable console (on a terminal, or when asked) or the book's
    printed lines (``book``: the evaluations, epoch samples and training time, nothing else); with
    ``log_file`` every event also goes to that file as JSON, whatever stdout shows."""
    stream = stream or sys.stdout
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    renderers = {"console": FittedConsoleRenderer, "json": structlog.processors.JSONRenderer}
    renderer = renderers[log_format]() if log_format in renderers else book_line
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks without frame locals: a local can hold a secret (an API key, a credential).
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
            if log_format == "json" or log_file
            else structlog.processors.format_exc_info,
            *([JsonFileCopy(log_file)] if log_file else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *args: BarSafeLogger(stream),
        cache_logger_on_first_use=False,
    )


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fit_line(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible columns (ANSI colour codes take none), ending in an ellipsis."""
    if len(ANSI.sub("", line)) <= width:
        return line
    out, visible = [], 0
    for part in re.split(f"({ANSI.pattern})", line):
        if ANSI.fullmatch(part):
            out.append(part)
            continue
        room = width - 1 - visible
        out.append(part[: max(room, 0)])
        visible += min(len(part), max(room, 0))
    return "".join(out) + "\u2026\x1b[0m"


class FittedConsoleRenderer:
    """structlog's console renderer, each event on one line that fits the terminal (at most 120
    columns): a person reads the gist, the JSON (``--log-format json`` or ``--log-file``) has it all."""

    def __init__(self):
        self.render = structlog.dev.ConsoleRenderer()

    def __call__(self, logger, method: str, event_dict: dict) -> str:
        width = min(shutil.get_terminal_size((120, 24)).columns, 120)
        flat = {k: " ".join(v.split()) if isinstance(v, str) and k != "exception" else v for k, v in event_dict.items()}
        rendered = self.render(logger, method, flat)
        first, _, rest = rendered.partition("\n")  # a traceback stays whole below its line
        return fit_line(first, width) + (f"\n{rest}" if rest else "")


class BarSafeLogger:
    """Prints each event line as ``tqdm.write`` does (a progress bar on the same terminal is cleared first and
    redrawn after, instead of the line landing at the end of the bar), but in one write: processes that
    share a stdout (a group on one node) never put a line between a record and its newline."""

    def __init__(self, file):
        self.file = file

    def msg(self, message: str) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.file):
            self.file.write(message + "\n")
            self.file.flush()

    debug = info = warning = warn = error = critical = exception = fatal = failure = log = msg


class JsonFileCopy:
    """A processor that appends each event to a file as a JSON line and passes it on unchanged."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (open for the process's life)
        self.render = structlog.processors.JSONRenderer()

    def __call__(self, logger, method: str, event_dict: dict) -> dict:
        self.file.write(self.render(logger, method, dict(event_dict)) + "\n")
        return event_dict


def book_line(logger, method: str, event_dict: dict) -> str:
    """The line the book's code prints for the events it prints (``train_model_simple``'s evaluations
    and epoch samples, the chapter's training time); every other event is dropped from stdout."""
    event = event_dict["event"]
    if event == "eval":
        line = (
            f"Ep {event_dict['epoch']} (Step {event_dict['step']:06d}): "
            f"Train loss {event_dict['train_loss']:.3f}, Val loss {event_dict['val_loss']:.3f}"
        )
        if "train_chosen_reward" in event_dict:  # train_model_dpo_simple's line
            margins = [event_dict[f"{s}_chosen_reward"] - event_dict[f"{s}_rejected_reward"] for s in ("train", "val")]
            line += f", Train reward margins {margins[0]:.3f}, Val reward margins {margins[1]:.3f}"
        return line
    if event == "sample":  # generate_and_print_sample: prompt and continuation on one line
        return (event_dict["prompt"] + event_dict["generated"]).replace("\n", " ")
    if event in ("finetune_done", "dpo_done"):
        return f"Training completed in {event_dict['loop_seconds'] / 60:.2f} minutes."
    raise structlog.DropEvent


def bind(**fields) -> None:
    """Attach fields (run_id, stage, rank) to every later event of this process."""
    structlog.contextvars.bind_contextvars(**fields)


def get_logger(name: str | None = None):
    return structlog.get_logger(name)


def stderr_is_terminal() -> bool:
    """Progress bars only when a person watches a terminal; log events otherwise."""
    return sys.stderr.isatty()


class Progress:
    """A long loop's progress: a tqdm bar on a terminal; off it, a ``progress`` event (``fraction``,
    ``eta_s`` and the loop's own fields) at most every ``every_s`` seconds and at the end. Either
    way the ``sft_job_progress_fraction`` and ``sft_job_eta_seconds`` gauges follow it."""

    def __init__(
        self,
        stage: str,
        total: int,
        done: int = 0,
        unit: str = "it",
        metrics: Metrics | None = None,
        every_s: float = 10.0,
        clock=time.monotonic,
        terminal: bool | None = None,
    ):
        self.stage, self.total, self.done, self.metrics = stage, total, done, metrics
        self.every_s, self.clock = every_s, clock
        self.started, self.start_done, self.last_event = clock(), done, None
        self.bar = None
        if stderr_is_terminal() if terminal is None else terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, desc=stage, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        elapsed, made = self.clock() - self.started, self.done - self.start_done
        eta = elapsed / made * (self.total - self.done) if made > 0 else None
        fraction = self.done / self.total if self.total else 1.0
        if self.metrics is not None:
            self.metrics.progress_fraction.labels(stage=self.stage).set(fraction)
            if eta is not None:
                self.metrics.eta_seconds.labels(stage=self.stage).set(eta)
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(n)
            return
        now, finished = self.clock(), self.done >= self.total
        if finished or self.last_event is None or now - self.last_event >= self.every_s:
            self.last_event = now
            get_logger(__name__).info(
                "progress",
                stage=self.stage,
                done=self.done,
                total=self.total,
                fraction=round(fraction, 4),
                eta_s=None if eta is None else round(eta, 1),
                **fields,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Metrics:
    """Every metric the job exports, in a registry of its own (tests read exact values)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    run_id: str = ""  # the label of the run's own gauges (``for_run``)

    def __post_init__(self) -> None:
        r, p = self.registry, "sft_job_"
        self.stage_duration_seconds = Gauge(p + "stage_duration_seconds", "Wall time of a stage", ["stage"], registry=r)
        self.stage_status = Gauge(p + "stage_status", "0 pending, 1 running, 2 done, 3 failed", ["stage"], registry=r)
        self.train_loss = Gauge(p + "train_loss", "Latest evaluated training loss", registry=r)
        self.val_loss = Gauge(p + "val_loss", "Latest evaluated validation loss", registry=r)
        self.train_step = Gauge(p + "train_step", "Optimizer steps taken", registry=r)
        self.epoch = Gauge(p + "epoch", "Current epoch (1-based)", registry=r)
        self.train_tokens_total = Counter(p + "train_tokens", "Tokens trained on", registry=r)
        self.train_tokens_per_second = Gauge(p + "train_tokens_per_second", "Training throughput", registry=r)
        self.learning_rate = Gauge(p + "learning_rate", "Optimizer learning rate", registry=r)
        self.gpu_memory_allocated_bytes = Gauge(p + "gpu_memory_allocated_bytes", "CUDA memory allocated", registry=r)
        self.parameters = Gauge(p + "parameters", "Model parameters: total, and those that train", ["kind"], registry=r)
        self.checkpoint_seconds = Gauge(p + "checkpoint_seconds", "Time to write the last checkpoint", registry=r)
        self.download_bytes_total = Counter(p + "download_bytes", "Bytes downloaded into the cache", registry=r)
        self.generate_tokens_total = Counter(p + "generate_tokens", "Tokens generated", registry=r)
        self.generate_tokens_per_second = Gauge(p + "generate_tokens_per_second", "Generation throughput", registry=r)
        self.judge_requests_total = Counter(p + "judge_requests", "Judge requests by outcome", ["outcome"], registry=r)
        self.judge_score = Histogram(p + "judge_score", "Judge scores", buckets=tuple(range(10, 101, 10)), registry=r)
        self.judge_score_mean = Gauge(p + "judge_score_mean", "Mean judge score", registry=r)
        self.artifact_bytes_uploaded_total = Counter(
            p + "artifact_bytes_uploaded", "Bytes written to storage", registry=r
        )
        self.last_success_timestamp_seconds = Gauge(
            p + "last_success_timestamp_seconds", "When the job last finished successfully", registry=r
        )
        self.info = Gauge(p + "info", "Job identity", ["version", "model", "run_id"], registry=r)
        self.progress_fraction = Gauge(p + "progress_fraction", "Share of a stage's loop done", ["stage"], registry=r)
        self.eta_seconds = Gauge(p + "eta_seconds", "Estimated seconds left in a stage's loop", ["stage"], registry=r)
        self.dpo_reward_margin = Gauge(
            p + "dpo_reward_margin", "Latest evaluated DPO reward margin (chosen - rejected)", ["split"], registry=r
        )
        self._add_run_gauges()

    def _add_run_gauges(self) -> None:
        """The gauges the alerts read (deploy/prometheus/alerts.yml), each labelled with the run's id."""
        r, p, run = self.registry, "sft_job_", ["run_id"]
        self.run_status = Gauge(p + "run_status", "1 running, 2 done, 3 failed, 4 stopped to retry", run, registry=r)
        self.restarts = Gauge(p + "restarts", "Times the scheduler restarted the run", run, registry=r)
        self.last_step_timestamp_seconds = Gauge(
            p + "last_step_timestamp_seconds", "When the last optimizer step ended (or training began)", run, registry=r
        )
        self.last_checkpoint_timestamp_seconds = Gauge(
            p + "last_checkpoint_timestamp_seconds", "When a checkpoint was last written (0: none yet)", run, registry=r
        )
        self.last_checkpoint_upload_timestamp_seconds = Gauge(
            p + "last_checkpoint_upload_timestamp_seconds",
            "When a checkpoint last reached the run's storage (0: none yet)",
            run,
            registry=r,
        )

    def for_run(self, run_id: str, restarts: int | None) -> None:
        """The run's gauges from now on carry ``run_id``: running, restarted ``restarts`` times (not exported
        where unknown), no checkpoint yet."""
        self.run_id = run_id
        self.set_run_status(RunStatus.RUNNING)
        if restarts is not None:
            self.restarts.labels(run_id).set(restarts)
        self.last_checkpoint_timestamp_seconds.labels(run_id).set(0)
        self.last_checkpoint_upload_timestamp_seconds.labels(run_id).set(0)

    def set_run_status(self, status: RunStatus) -> None:
        self.run_status.labels(self.run_id).set(status)

    def step_taken(self) -> None:
        self.last_step_timestamp_seconds.labels(self.run_id).set_to_current_time()

    def checkpoint_written(self) -> None:
        self.last_checkpoint_timestamp_seconds.labels(self.run_id).set_to_current_time()

    def checkpoint_stored(self) -> None:
        self.last_checkpoint_upload_timestamp_seconds.labels(self.run_id).set_to_current_time()

    def observe_evaluation(self, figures: dict[str, float]) -> None:
        """An evaluation's figures: the losses, and with DPO's rewards the reward margins."""
        self.train_loss.set(figures["train_loss"])
        self.val_loss.set(figures["val_loss"])
        for split in ("train", "val"):
            if f"{split}_chosen_reward" in figures:
                margin = figures[f"{split}_chosen_reward"] - figures[f"{split}_rejected_reward"]
                self.dpo_reward_margin.labels(split).set(margin)

    def value(self, name: str, labels: dict | None = None) -> float | None:
        """A sample's current value, by its full exported name (for tests and summaries)."""
        return self.registry.get_sample_value(name, labels or {})


class MetricsPublisher:
    """Serves the job's registry over HTTP for the whole run and pushes it to a Pushgateway
    (``pushadd``, grouping key job + run_id) at each stage's end and at exit, failure included.

    ``port``: 0 serves nothing, None a free port the system picks (two jobs on one node, or a node
    exporter on 9100, cannot collide), any other the port asked for, or a ConfigError (exit 2): a
    port given by hand is what a static scrape config names. With ``sd_dir`` the endpoint is
    published for Prometheus' file-based service discovery while it serves."""

    def __init__(
        self,
        metrics: Metrics,
        port: int | None = 0,
        pushgateway: str | None = None,
        run_id: str = "",
        address: str = "127.0.0.1",
        sd_dir: str | None = None,
    ):
        self.metrics, self.port, self.pushgateway, self.run_id = metrics, port, pushgateway, run_id
        self.address, self.sd_dir = address, sd_dir
        self.server = None
        self.sd_file: Path | None = None

    def __enter__(self) -> MetricsPublisher:
        if self.port == 0:
            return self
        self.server = self._serve()
        port = self.server.server_port
        get_logger(__name__).info("metrics_serving", address=self.address, port=port)
        if self.sd_dir:
            try:
                self.sd_file = publish_target(Path(self.sd_dir), self.run_id, scrape_host(self.address), port)
            except OSError as exc:
                self.__exit__()
                raise ConfigError(
                    f"--metrics-sd-dir {self.sd_dir}: cannot write the scrape target there "
                    f"({exc.strerror or exc}): give a folder this job can write, or leave it unset"
                ) from None
        return self

    def _serve(self):
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(self.port or 0, addr=self.address, registry=self.metrics.registry)
        except OSError as exc:  # in use, an address that is not this machine's, a name that does not resolve
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be served ({exc.strerror or exc})"
            where = f"metrics port {self.port} on {self.address}" if self.port else f"metrics address {self.address}"
            raise ConfigError(
                f"{where} {reason}: choose another --metrics-port (unset: a free one) or "
                "--metrics-address, or --metrics-port 0 to turn the endpoint off"
            ) from None
        return server

    def push(self) -> None:
        if not self.pushgateway:
            return
        from prometheus_client import pushadd_to_gateway

        try:
            pushadd_to_gateway(
                self.pushgateway,
                job="sft-job",
                grouping_key={"run_id": self.run_id},
                registry=self.metrics.registry,
                timeout=10,
            )
        except OSError as exc:  # a missing gateway must not fail the job
            get_logger(__name__).warning("metrics_push_failed", pushgateway=self.pushgateway, error=str(exc))

    def __exit__(self, *exc) -> None:
        self.push()
        if self.sd_file is not None:  # Prometheus drops the target: no scrapes of a job that is gone
            self.sd_file.unlink(missing_ok=True)
            self.sd_file = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def scrape_host(address: str) -> str:
    """The host Prometheus reaches an endpoint listening on ``address`` at: for every interface this
    machine's fully qualified name (its short name where it has none), else the address itself (an IPv6
    one in brackets)."""
    if address in ("0.0.0.0", "::", ""):
        fqdn = socket.getfqdn()
        host = fqdn if "." in fqdn and not fqdn.startswith("localhost") else socket.gethostname()
    else:
        host = address
    return f"[{host}]" if ":" in host else host


def publish_target(folder: Path, run_id: str, host: str, port: int) -> Path:
    """``{folder}/{run_id}-{host}-{port}.json``: one target in file_sd_configs' format, labelled with
    the run id, written whole (renamed into place: Prometheus never reads half a file) and readable by
    all (0644, whatever the umask: Prometheus runs as another user; the file holds no secret)."""
    readable_folder(folder)
    name = f"{run_id}-{host.strip('[]').replace(':', '_')}-{port}.json"
    target = [{"targets": [f"{host}:{port}"], "labels": {"run_id": run_id}}]
    partial = folder / f".{name}.partial"  # outside a *.json glob
    partial.write_text(json.dumps(target) + "\n")
    partial.chmod(0o644)
    os.replace(partial, folder / name)
    return folder / name


def readable_folder(folder: Path) -> None:
    """``folder``, made where missing with the folders above it 0755 (a umask of 077 would hide them from
    Prometheus); one that exists but that neither its group nor others may list is warned about."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for made in missing:
        made.chmod(0o755)
    mode = folder.stat().st_mode
    if not missing and mode & 0o050 != 0o050 and mode & 0o005 != 0o005:
        get_logger(__name__).warning(
            "metrics_sd_dir_not_readable",
            folder=str(folder),
            mode=oct(mode & 0o777),
            hint="Prometheus running as another user cannot read the targets: chmod a+rx the folder",
        )
