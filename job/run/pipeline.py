"""``sft-job run``: preflight, then download -> finetune -> generate -> judge into one run folder.

The only module that knows the order of the stages. Each stage's artifacts are uploaded, then
the manifest records them (size and sha256), so a reader never sees an artifact list that points
at something missing; a rerun with the same run id skips stages whose artifacts still verify.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from job import __version__
from job.config import SMOKE_MODEL_NAME, RunConfig, smoke_data
from job.core.errors import ConfigError, ExitCode, JobError, exit_code_for
from job.core.observability import Metrics, MetricsPublisher, RunStatus, bind, get_logger
from job.core.parsing import ParseError, load_yaml
from job.core.settings import default_of, marks, parse_duration, redacted, result_changes, stage_config
from job.data.formats import Layout, layout, pair_style
from job.data.instructions import ChatStyle, dataset_file, prompt_style
from job.data.packing import best_fit_decreasing, checked_pack_length
from job.data.preference import fitting_pairs, preference_problem
from job.data.smoke import write_smoke_data
from job.data.sources import (
    FILE_TYPES,
    HUB_PREFIX,
    Splits,
    dataset_splits,
    resolve_source,
    source_digest,
    without_refused,
)
from job.models.families import family, model_tokenizer, read_shape
from job.models.gpt2 import GPTConfig, GPTModel, gpt2_config
from job.models.gpt2_weights import save_hf
from job.models.hub import (
    HUB_HEAD_FILES,
    cached_model_dir,
    fetch_model,
    hub_commit,
    hub_file,
    model_cached,
    model_downloader,
    model_files,
    tokenizer_files,
    tokenizer_folder,
)
from job.models.origin import ModelOrigin
from job.models.registry import gpt2_names, model_entry
from job.models.tokenizer import ByteTokenizer, encode
from job.run.lock import run_lock
from job.run.manifest import FAILURE_RECORD_PATIENCE_S, Manifest
from job.run.report import REPORT, fetch_inputs, write_report
from job.run.stage_record import StageRecorder
from job.stages.dpo import dpo_prompt_style, run_dpo
from job.stages.dpo_config import DPOConfig
from job.stages.export import GGUF_FILE, MODELFILE, check_exportable, run_export
from job.stages.export_config import ExportConfig
from job.stages.finetune import run_finetune
from job.stages.finetune_config import FinetuneConfig
from job.stages.generate import (
    RESPONSES_FILE,
    check_room,
    check_written_fields,
    longest_prompt,
    run_generate,
    saved_prompt_style,
)
from job.stages.generate_config import GenerateConfig
from job.stages.judge import preflight as judge_preflight
from job.stages.judge import run_judge
from job.stages.judge_config import JudgeConfig
from job.storage.fetch import Needed, check_local_inputs, check_reachable, damaged_files, file_problem
from job.storage.store import LocalStorage, Storage, open_storage, sha256_file
from job.training.binding import model_digest, run_binding, stage_name
from job.training.checkpoint import CheckpointUploader, fetch_checkpoint
from job.training.checkpoint_files import read_key
from job.training.roles import Roles
from job.training.stage_io import checked_splits, split_examples, trained_layout
from job.training.trainer import check_batches

log = get_logger(__name__)
SMOKE_MODEL = GPTConfig(vocab_size=ByteTokenizer.n_vocab, n_layers=2, emb_dim=64, n_heads=4)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # with --lora-rank, PEFT's layout
MODEL_FILES = ("model/model.safetensors", "model/config.json")  # GPT-2's; a Llama 3 / Qwen3 model/ has more
TRAINING_FILES = ("losses.json", "loss-plot.png")
REMOTE_SCHEMES = ("http://", "https://", "s3://")  # a dataset named so is downloaded into the cache
SWITCHED_STAGES = {"dpo": "dpo", "export": "export"}  # a stage that runs only where this option of run's is set


def recorded_options(cfg: RunConfig) -> dict:
    """The options as config.yaml records them: what ran, so with --model-dir no named model (null)."""
    return redacted(cfg) | ({"model": None} if cfg.model_dir else {})


def default_run_id(cfg: RunConfig) -> str:
    digest = hashlib.sha256(yaml.safe_dump(redacted(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{digest}"


class Pipeline:
    def __init__(self, cfg: RunConfig, metrics: Metrics):
        from accelerate import PartialState

        self.cfg, self.metrics = cfg, metrics
        self.run_id = cfg.run_id or default_run_id(cfg)
        retry_timeout = parse_duration(cfg.s3_retry_timeout, "s3_retry_timeout")
        self.storage = open_storage(f"{cfg.output.rstrip('/')}/{self.run_id}", cfg.s3_endpoint_url, retry_timeout)
        self.remote = not isinstance(self.storage, LocalStorage)  # S3: work in a local scratch folder
        scratch = Path(cfg.scratch) if cfg.scratch else Path(cfg.cache) / "scratch"
        self.work = scratch / self.run_id if self.remote else self.storage.root
        self.resolved = recorded_options(cfg) | {"run_id": self.run_id}  # what config.yaml and checkpoints hold
        self.stages: StageRecorder | None = None  # the main process's, once the preflight passed
        self.publisher: MetricsPublisher | None = None
        # cpu=True where there is no GPU: accelerate then forms the group over gloo (without it every
        # process of a CPU launch would take itself for the only one, and the main one).
        self.roles = Roles(PartialState(cpu=not torch.cuda.is_available()))

    # --- before anything ---------------------------------------------------------------------

    def preflight(self) -> None:
        """Everything that can fail fast fails here, before any download or training."""
        cfg = self.cfg
        if cfg.require_gpu and not torch.cuda.is_available():
            raise JobError("--require-gpu was given but no CUDA device is visible")
        read_key(cfg.checkpoint_key_file)
        prepare_smoke_data(cfg)
        pieces = missing_pieces(cfg)
        check_local_inputs(absent_local_data(cfg), pieces, Path(cfg.cache))
        check_reachable(pieces, Path(cfg.cache))
        check_data(cfg, self.roles.world)
        if not cfg.skip_judge:
            judge_preflight(self.judge_config())
        log.info("preflight_ok", output=self.storage.url, work=str(self.work))

    def _check_same_run(self) -> str | None:
        return check_same_run(self.storage, self.run_id, self.resolved, type(self.cfg))

    def _start(self) -> StageRecorder:
        """The main process: the same run's options, the preflight, then the run's records."""
        saved = self._check_same_run()
        self.preflight()
        manifest = Manifest(self.storage, self.run_id, self.work / "manifest.json" if self.remote else None)
        inputs = run_inputs(self.cfg)
        check_same_inputs(manifest.data.get("inputs"), inputs, self.run_id)
        self.work.mkdir(parents=True, exist_ok=True)
        if saved is None:
            self.storage.put_text("config.yaml", inputs_header(inputs) + yaml.safe_dump(self.resolved, sort_keys=False))
        manifest.data.pop("stopped", None)
        manifest.data["inputs"] = inputs
        manifest.record(status="running")
        self.metrics.info.labels(version=__version__, model=_model_label(self.cfg), run_id=self.run_id).set(1)
        return StageRecorder(manifest, self.storage, self.work, self.metrics)

    # --- the stages ----------------------------------------------------------------------------

    def run(self) -> dict:
        """The stages, with the run's lock held by the main process from start to end."""
        if not self.roles.keeps_run:
            return self._run_stages()
        fresh = not self.remote and not self.storage.root.exists()
        self.storage.check_writable()
        lock = run_lock(self.storage, self.run_id, parse_duration(self.cfg.lock_lease, "lock_lease"))
        try:
            take_run(lock, self.metrics, self.run_id, self.publisher)
            return self._run_stages()
        except BaseException as exc:
            record_run_end(self.metrics, exc)
            if self.stages is not None:
                self.stages.record_stop(exc)
                report_stopped_run(self.storage, self.work, self.remote)
            raise
        finally:
            lock.release()
            if fresh and self.stages is None:  # failed before any stage: leave nothing behind
                shutil.rmtree(self.storage.root, ignore_errors=True)

    def _run_stages(self) -> dict:
        if self.roles.keeps_run:
            self.stages = self._start()
            self.stages.publisher = self.publisher
            self.stages.run("download", self.download, done=self.cache_complete)
        elif self.roles.prepares_node and not self.cache_complete():
            self.download()  # another node: the cache is this machine's (the main one records the stage)
        self.roles.together()
        training = ["finetune", "dpo"] if self.cfg.dpo else ["finetune"]
        done = self.roles.main_decides(lambda: {name: self.stages.is_done(name) for name in training})
        if not self.roles.keeps_run:  # every process trains; the main one records the stages
            for name in training:
                if not done[name]:
                    getattr(self, name)()
            return {}
        for name in training:  # as decided for every process
            self.stages.run(name, getattr(self, name), done=lambda name=name: done[name])
        if self.cfg.export:
            self.stages.run("export", self.export)
        self.stages.run("generate", self.generate)
        if not self.cfg.skip_judge:
            self.stages.run("judge", self.judge)
        bind(stage="run")
        with self.stages.step("report"):
            report(self.storage, self.work, self.remote)
        self.stages.manifest.record(status="complete")
        log.info("run_complete", run_id=self.run_id, output=self.storage.url)
        return self.stages.manifest.data

    def download(self) -> list[str]:
        prepare_smoke_data(self.cfg)
        fetch_run_files(self.cfg, self.metrics)
        return []

    def cache_complete(self) -> bool:
        """The cache is this machine's: the download stage counts as done only where its files are."""
        return run_files_cached(self.cfg)

    def finetune(self) -> list[str]:
        start = self._start_model_dir()
        cfg = stage_config(self.cfg, "finetune", FinetuneConfig, output=str(self.work), **stage_model(self.cfg, start))
        return _artifacts(self._train(run_finetune, cfg, "checkpoints"), "")

    def dpo(self) -> list[str]:
        """DPO from the finetuned model (each node's first process brings it back where this machine lacks it)."""
        self.roles.together()  # the main process has uploaded the finetune stage's model
        if self.roles.prepares_node:
            self._ensure_local(model_keys(self.stages.manifest, ""))
        start, out = str(self.work / "model"), str(self.work / "dpo")
        style = dpo_prompt_style(named_prompt_style(self.cfg), saved_prompt_style(start))  # as `sft-job dpo`'s
        model = stage_model(self.cfg, start)
        cfg = stage_config(self.cfg, "dpo", DPOConfig, output=out, prompt_style=style, train_on="assistant", **model)
        outputs = self._train(run_dpo, cfg, "dpo/checkpoints")
        return [*_artifacts(outputs, "dpo/"), "dpo/reward-margins-plot.png"] if outputs else []

    def _train(self, runner, cfg, folder: str) -> dict:
        """A training stage on every process: each node resumes from its own scratch folder, so the first
        process of every node fetches the newest checkpoint, and none starts before every fetch is done."""
        binding = run_binding(cfg, self.run_id) if self.roles.prepares_node else None
        if self.roles.prepares_node and self.remote:
            key = read_key(self.cfg.checkpoint_key_file)
            fetch_checkpoint(self.storage, self.work, key=key, folder=folder, binding=binding)
        self.roles.together()
        binding = binding or run_binding(cfg, self.run_id)  # once this node's inputs are in place
        if self.roles.keeps_run:
            self.stages.manifest.update(stage_name(cfg), binding=binding)  # written with the stage's record
        uploads = self.remote and self.roles.keeps_run
        uploader = CheckpointUploader(self.storage, self.metrics, folder) if uploads else None
        with uploader or contextlib.nullcontext():
            return runner(cfg, self.metrics, saved_config=self.resolved, on_checkpoint=uploader, binding=binding)

    def _start_model_dir(self) -> str:
        cfg = self.cfg
        if not random_model(cfg):
            return cfg.model_dir or str(cached_model_dir(cfg))
        path = self.work / "smoke-model"
        # every node's first process makes it in its own scratch folder: the same seed, the same weights
        if self.roles.prepares_node and not (path / "model.safetensors").is_file():
            torch.manual_seed(cfg.seed)
            save_hf(GPTModel(SMOKE_MODEL), path, extra_config={"sft_job": {"tokenizer": ByteTokenizer.name}})
        self.roles.together()
        return str(path)

    def export(self) -> list[str]:
        self._ensure_local(model_keys(self.stages.manifest, generated_from(self.cfg)[-1][0]))
        return export_last_model(self.cfg, self.work, self.metrics)

    def generate(self) -> list[str]:
        """Responses of the last model trained; with --dpo also the finetuned model's, under sft/."""
        keys = []
        for trained, out in generated_from(self.cfg):
            self._ensure_local(model_keys(self.stages.manifest, trained))
            model, folder = str(self.work / trained / "model"), str(self.work / out)
            run_generate(
                stage_config(self.cfg, "generate", GenerateConfig, model_dir=model, output=folder), self.metrics
            )
            keys.append(f"{out}{RESPONSES_FILE}")
        return keys

    def judge_config(self, out: str = "") -> JudgeConfig:
        folder = self.work / out
        return stage_config(self.cfg, "judge", JudgeConfig, responses=str(folder / RESPONSES_FILE), output=str(folder))

    def judge(self) -> list[str]:
        keys = []
        for _trained, out in generated_from(self.cfg):
            self._ensure_local([f"{out}{RESPONSES_FILE}"])
            run_judge(self.judge_config(out), self.metrics)
            keys += [f"{out}scores.json", f"{out}summary.json"]
        return keys

    def _ensure_local(self, keys) -> None:
        """Artifacts of a skipped stage, brought back from storage when this machine lacks them."""
        for key in keys:
            if not (self.work / key).is_file():
                self.storage.get_file(key, self.work / key)


def export_last_model(cfg: RunConfig, work: Path, metrics: Metrics) -> list[str]:
    """The last model trained (DPO's with --dpo) as GGUF with its Modelfile, under export/."""
    model = str(work / generated_from(cfg)[-1][0] / "model")
    # the model's recorded layout; the run's --prompt-style only where it recorded none (text data)
    style = None if saved_prompt_style(model) else named_prompt_style(cfg)
    export = stage_config(cfg, "export", ExportConfig, model_dir=model, output=str(work / "export"), prompt_style=style)
    run_export(export, metrics)
    return [f"export/{GGUF_FILE}", f"export/{MODELFILE}"]


def generated_from(cfg: RunConfig) -> list[tuple[str, str]]:
    """(model folder, output folder) in the run for each model generate and judge answer with: the model
    trained; with --dpo first the finetuned one (its files under sft/), then the DPO one, as the book's
    notebook sets the reference's responses beside the policy's. The last one's are the run's results."""
    return [("", "sft/"), ("dpo/", "")] if cfg.dpo else [("", "")]


def report(storage: Storage, work: Path, remote: bool) -> None:
    """``report.html`` from the run's files, beside them."""
    if remote:
        fetch_inputs(storage, work)
    path = write_report(work)
    if remote:
        storage.put_file(path, REPORT)
    log.info("report_written", path=f"{storage.url}/{REPORT}")


def report_stopped_run(storage: Storage, work: Path, remote: bool) -> None:
    """A run that failed or was stopped still gets its report (where it stopped, and why): a short wait
    for the store at most, and never an error of its own, since the run's error is the one to report."""
    try:
        with storage.patience(FAILURE_RECORD_PATIENCE_S):
            report(storage, work, remote)
    except Exception as exc:  # noqa: BLE001
        log.error("report_failed", error=f"{type(exc).__name__}: {exc}")


def run_inputs(cfg: RunConfig) -> dict:
    """What the run trains from, as the manifest and config.yaml's header record it: the model (the
    smoke's random one says so), each dataset and a --chat-template file, with the sha256 of what was read."""
    if random_model(cfg):
        model = f"random {SMOKE_MODEL.n_layers}-layer GPT-2 (the smoke's own, seed {cfg.seed}), byte tokenizer"
    elif cfg.model_dir:
        model = cfg.model_dir
    elif model_entry(cfg.model).from_hub:  # the commit the preflight's first file named, so a moved branch shows
        model = f"{cfg.model} ({model_entry(cfg.model).repo} at {hub_commit(cfg) or cfg.hub_revision})"
    else:
        model = f"{cfg.model} ({'OpenAI' if cfg.source == 'openai' else 'Hugging Face'} weights)"
    inputs = {"model": model}
    if cfg.model_dir and not cfg.smoke:
        inputs["model_dir"] = {"source": cfg.model_dir, "sha256": model_digest(Path(cfg.model_dir))}
    for name in ("data", "dpo_data") if cfg.dpo else ("data",):
        source = resolve_source(getattr(cfg, name), Path(cfg.cache), cfg.base_url, cfg.data_split, cfg)
        inputs[name] = {"source": getattr(cfg, name), "sha256": source_digest(source)}
    if cfg.chat_template:  # it decides the tokens and the loss mask as the data does
        inputs["chat_template"] = {"source": cfg.chat_template, "sha256": sha256_file(Path(cfg.chat_template))}
    return inputs


def check_same_run(storage: Storage, run_id: str, resolved: dict, cls: type) -> str | None:
    """A rerun must ask for what the run was started with; returns the run's config.yaml."""
    saved = storage.get_text("config.yaml")
    if saved is None:
        return None
    what = f"config.yaml of run {run_id} ({storage.url})"
    options = load_yaml(saved, what)
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ParseError(f"{what} is not a mapping of option names to values: not a file this job wrote")
    if options.get("model_dir"):  # a run started before config.yaml recorded null there: the model was unused
        options["model"] = None
    unused = unused_stage_options(options, resolved, cls)
    changes = result_changes(comparable_options(options, unused), comparable_options(resolved, unused), cls)
    if changes:
        # A run's export is one of its results; another type of its model is sft-job export's to write.
        other_type = any(change.startswith("export_dtype ") for change in changes)
        dtype = resolved.get("export_dtype")
        export = (
            f"; for its model in {dtype}: sft-job export --dtype {dtype} --model-dir its model/ (dpo/model/ with --dpo)"
        )
        raise ConfigError(
            f"run {run_id} was started with other options: {'; '.join(changes)}. "
            f"Rerun with the run's options (its config.yaml), or give another --run-id{export if other_type else ''}"
        )
    return saved


def unused_stage_options(saved: dict, current: dict, cls: type) -> set[str]:
    """The options that feed a stage neither the run nor its rerun enables (--dpo-data without --dpo, as
    --export-dtype without --export): they change no result, so a rerun may change them."""
    off = {stage for stage, switch in SWITCHED_STAGES.items() if not saved.get(switch) and not current.get(switch)}
    return {name for name in cls.model_fields if (marks(cls, name).get("feeds") or ("",))[0] in off}


def comparable_options(options: dict, unused: set[str]) -> dict:
    """``options`` as a rerun compares them: ``unused`` left out, and a dataset that is the smoke's own data in
    the run's --cache named so rather than by its path (the cache is an operational folder; the manifest binds
    the data's bytes by sha256)."""
    own = smoke_data(options["cache"]) if isinstance(options.get("cache"), str) else None
    kept = {name: value for name, value in options.items() if name not in unused}
    smokes = [name for name in ("data", "dpo_data") if own and kept.get(name) == own]
    return kept | dict.fromkeys(smokes, "the smoke's own data in --cache")


def check_same_inputs(recorded: dict | None, inputs: dict, run_id: str) -> None:
    """A rerun trains from the bytes the run began with: a dataset or --model-dir that changed since is
    exit 2 naming it with both sha256s (``recorded``: the manifest's, None before the first start)."""
    for name, now in inputs.items():
        then = (recorded or {}).get(name)
        if isinstance(now, dict) and isinstance(then, dict) and then.get("sha256") != now["sha256"]:
            raise ConfigError(
                f"--{name.replace('_', '-')} {now['source']} changed since run {run_id} began: sha256 "
                f"{then.get('sha256')} then, {now['sha256']} now. Restore it, or give another --run-id"
            )


def inputs_header(inputs: dict) -> str:
    """config.yaml's first lines: what the options resolved to, as comments (the file stays a --config)."""
    lines = [f"# model used: {inputs['model']}"]
    lines += [f"# {name} used: {v['source']} (sha256 {v['sha256']})" for name, v in inputs.items() if name != "model"]
    return "\n".join(lines) + "\n"


def _model_label(cfg: RunConfig) -> str:
    return cfg.model_dir or cfg.model


def model_keys(manifest: Manifest, prefix: str) -> list[str]:
    """The files of a trained model/ folder (``prefix``: "" finetune's, "dpo/" DPO's) as its stage recorded
    them: GPT-2's two, a Llama 3 / Qwen3 model's tokenizer files too."""
    recorded = manifest.stage("dpo" if prefix else "finetune").get("artifacts", {})
    return [k for k in recorded if k.startswith(f"{prefix}model/")] or [f"{prefix}{k}" for k in MODEL_FILES]


def _artifacts(outputs: dict, prefix: str) -> list[str]:
    """The keys of a training stage's outputs in the run folder (none on the processes that wrote none)."""
    if not outputs:
        return []
    model = sorted(f"model/{p.name}" for p in outputs["model"].iterdir() if p.is_file())
    adapter = [f"adapter/{name}" for name in ADAPTER_FILES] if "adapter" in outputs else []
    pth = [outputs["pth"].name] if "pth" in outputs else []
    return [f"{prefix}{key}" for key in (*model, *TRAINING_FILES, *pth, *adapter)]


def smoke_data_used(cfg: RunConfig) -> list[Path]:
    """The smoke's own dataset, where the run reads it (no --data, or with --dpo no --dpo-data, named)."""
    path = smoke_data(cfg.cache)
    return [Path(path)] if cfg.smoke and path in (cfg.data, cfg.dpo_data if cfg.dpo else None) else []


def prepare_smoke_data(cfg: RunConfig) -> None:
    for path in smoke_data_used(cfg):
        write_smoke_data(path)


def run_files(cfg: RunConfig) -> list:
    """What the run needs in the cache besides the named model (``fetch_model``'s): GPT-2's tokenizer (the
    smoke's is made in memory; a Llama 3 / Qwen3 folder carries its own), a remote dataset."""
    files = tokenizer_files(cfg.base_url) if _gpt2(cfg) else []
    datasets = [cfg.data, cfg.dpo_data] if cfg.dpo else [cfg.data]
    files += [dataset_file(d, cfg.base_url) for d in datasets if d.startswith(REMOTE_SCHEMES)]
    return files


def _datasets(cfg: RunConfig) -> list[tuple[str, str]]:
    """(flag, value) of each dataset the run reads."""
    return [("--data", cfg.data), ("--dpo-data", cfg.dpo_data)][: 2 if cfg.dpo else 1]


def absent_local_data(cfg: RunConfig) -> list[str]:
    """Each local --data / --dpo-data file that is not there (a URL's is the download's to fetch)."""
    local = [(flag, value) for flag, value in _datasets(cfg) if not value.startswith((*REMOTE_SCHEMES, HUB_PREFIX))]
    return [why for flag, value in local if (why := _absent(flag, value)) is not None]


def _absent(flag: str, value: str) -> str | None:
    if not value:
        return f"{flag} is empty"
    path = Path(value)
    if path.is_dir():  # a folder of split files needs its train file
        trains = [path / f"train{suffix}" for suffix in FILE_TYPES]
        kinds = ", ".join(p.name for p in trains)
        return (
            None if any(p.is_file() for p in trains) else f"{flag} {value} is a folder without a train file ({kinds})"
        )
    return None if path.is_file() else f"{flag} {value} {'is not a file' if path.exists() else 'does not exist'}"


def missing_pieces(cfg: RunConfig) -> list[Needed]:
    """What the run would download that the cache lacks or holds damaged (the downloader's own check), each with
    its way in: a dataset named by URL, GPT-2's tokenizer, the named model's weights (a hub model's with its
    tokenizer)."""
    cache = Path(cfg.cache)
    pieces = []
    for flag, value in _datasets(cfg):
        if value.startswith(REMOTE_SCHEMES):
            remote = dataset_file(value, cfg.base_url)
            pieces.append(Needed(f"the dataset {remote.relpath}", (remote,), f"{flag} FILE"))
    if _gpt2(cfg):
        way_in = f"encoder.json and vocab.bpe copied into {cache / 'gpt2'}"
        pieces.append(Needed("GPT-2's tokenizer", tuple(tokenizer_files(cfg.base_url)), way_in))
    pieces = [p for p in pieces if not _cached(p, cache)]
    if not (random_model(cfg) or cfg.model_dir or model_cached(cfg)):
        hub = model_entry(cfg.model).from_hub
        gpt2 = () if hub else tuple(model_files(cfg.model, cfg.source, cfg.base_url, cfg.hub_url))
        files = (hub_file(cfg, HUB_HEAD_FILES[0]),) if hub else gpt2
        what = f"the weights{' and tokenizer' if hub else ''} of {cfg.model}"
        pieces.append(Needed(what, files, files[0].way_in))
    return [_naming_damage(p, cache) for p in pieces]


def _cached(piece: Needed, cache: Path) -> bool:
    return all((cache / f.relpath).is_file() and file_problem(cache / f.relpath, f) is None for f in piece.files)


def _naming_damage(piece: Needed, cache: Path) -> Needed:
    """The piece, its cached files that are damaged named (the way in replaces them)."""
    damaged = damaged_files(cache, piece.files)
    return (
        dataclasses.replace(piece, what=f"{piece.what} (damaged in the cache: {', '.join(damaged)})")
        if damaged
        else piece
    )


def fetch_run_files(cfg: RunConfig, metrics: Metrics) -> None:
    """The download stage: ``run_files`` and the named model, through one downloader with the hub's token."""
    downloader = model_downloader(cfg, metrics)
    downloader.fetch_all(run_files(cfg))
    if not (random_model(cfg) or cfg.model_dir):
        fetch_model(cfg, downloader)


def run_files_cached(cfg: RunConfig) -> bool:
    files = [Path(cfg.cache) / f.relpath for f in run_files(cfg)] + smoke_data_used(cfg)
    return all(path.is_file() for path in files) and (random_model(cfg) or bool(cfg.model_dir) or model_cached(cfg))


def random_model(cfg: RunConfig) -> bool:
    """Whether the run trains the smoke's random 2-layer GPT-2 (--model smoke: --smoke's unless --model or
    --model-dir is given), which the run makes itself: nothing to download, a byte tokenizer."""
    return cfg.model == SMOKE_MODEL_NAME


def stage_model(cfg: RunConfig, start: str) -> dict:
    """A training stage's model: the folder it starts from. The smoke's random model has no name a stage
    knows; the stage reads it from its folder, so the stage's --model keeps its default."""
    return {"model_dir": start} | ({"model": default_of(ModelOrigin, "model")} if random_model(cfg) else {})


def _gpt2(cfg: RunConfig) -> bool:
    """Whether the run starts from a GPT-2 (a named size, or a folder of one)."""
    return family(cfg.model_dir) == "gpt2" if cfg.model_dir else cfg.model in gpt2_names()


def check_data(cfg: RunConfig, world: int) -> None:
    """The dataset as the stages will read it, and what depends on it and on the model's shape: the fields the
    job writes, the batches, the context, what trains, the packed rows, the stages after the finetune."""
    splits = dataset_splits(cfg, need=("validation", "test"))
    check_written_fields(splits)
    entries = splits.train + splits.val + splits.test
    check_batches(cfg, world, len(splits.train[: cfg.train_limit]), dataset_entries=len(entries))
    fit = check_model_fit(cfg, splits.test, splits.data_format, entries, splits.origin)
    splits = without_refused(splits, fit[1], ("train", "validation", "test"))  # a split --skip-invalid emptied
    examples = check_trainable(cfg, world, splits, *fit)
    check_packed_batches(cfg, world, examples, fit[2])
    check_later_stages(cfg, *fit)


def check_model_fit(cfg: RunConfig, test: list[dict], data_format: str = "alpaca", entries=None, origin=None) -> tuple:
    """What depends on the model's shape, known before training: the longest test prompt and
    --max-new-tokens fit its context; a LoRA rank is at most its width; conversations have a chat template
    (exit 2) that renders every entry (``origin`` names one it refuses; ``--skip-invalid`` drops it). ``test``:
    the whole split, which generate cuts to --limit after those drops. Returns the model's tokenizer, the
    layout and the context length."""
    random = random_model(cfg)
    # a hub model's config and tokenizer, before its weights
    folder = None if random else tokenizer_folder(cfg, cfg.model_dir)
    if random:
        shape = SMOKE_MODEL
    else:
        shape = read_shape(folder) if folder else gpt2_config(cfg.model)
    if cfg.lora_rank is not None and cfg.lora_rank > shape.emb_dim:
        raise ConfigError(f"--lora-rank {cfg.lora_rank} is more than the model's width of {shape.emb_dim}")
    tokenizer = ByteTokenizer() if random else model_tokenizer(folder, cfg.cache, cfg.base_url)
    style = prompt_style(cfg.prompt_style, tokenizer)
    how = layout(cfg, data_format, entries or test, tokenizer, style, origin)
    test = how.kept(test)[: cfg.limit]
    if not test:  # every test entry refused: without_refused names the split
        return tokenizer, how, shape.context_length
    longest, which = longest_prompt([encode(tokenizer, how.prompt(e)) for e in test])
    check_room(cfg.max_new_tokens, longest, shape.context_length, which)
    return tokenizer, how, shape.context_length


def check_trainable(cfg: RunConfig, world: int, splits: Splits, tokenizer, how: Layout, context: int) -> list | None:
    """The training split's examples as the finetune stage makes them, where the preflight needs them (formats
    other than the book's, which leave out an entry with nothing to train within the limit; --packing, which packs
    them): each split keeps an entry to train on, the training split a batch of them, else it is refused here,
    as the stage would refuse it after the preflight. None where no check needs them."""
    if how.data_format == "alpaca" and not cfg.packing:
        return None
    max_length = min(cfg.allowed_max_length, context)
    limited = dataclasses.replace(splits, train=splits.train[: cfg.train_limit])
    train, _val = split_examples(how, limited, tokenizer, max_length)
    if how.data_format != "alpaca":
        check_batches(cfg, world, len(train), "entries with a token to train on")
    return train


def check_packed_batches(cfg: RunConfig, world: int, examples: list | None, context: int) -> None:
    """With --packing, what the finetune stage would refuse after the preflight, checked before anything is
    written: the rows' length, and a batch of packed rows, the training split (``examples``) packed as the stage
    packs it."""
    if not cfg.packing or examples is None:
        return
    max_length = min(cfg.allowed_max_length, context)
    pack_length = checked_pack_length(cfg.pack_length, examples, max_length, context)
    lengths = [min(len(e.token_ids), max_length) for e in examples]
    check_batches(cfg, world, len(best_fit_decreasing(lengths, pack_length, cfg.seed)), "packed rows")


def check_later_stages(cfg: RunConfig, tokenizer, how: Layout, context_length: int) -> None:
    """What the stages after the finetune need of the model, before it: --dpo's preference data, and what
    --export's stage would refuse for the last model trained (exit 2 naming why) or write inexactly (warned
    of here, before the training, as the stage warns of it after)."""
    last = check_preference_data(cfg, tokenizer, how, context_length) or how
    if cfg.export:
        folder = None if random_model(cfg) else tokenizer_folder(cfg, cfg.model_dir)
        # the template the trained model will carry: the data's (a --chat-template file's), else its tokenizer's
        template = last.template or getattr(tokenizer, "chat_template", None)
        source = template.source if template else None
        for caveat in check_exportable(folder, tokenizer, export_style(cfg, last), Path(cfg.cache), source):
            log.warning("modelfile_template_inexact", why=caveat, stage_to_come="export")


def named_prompt_style(cfg: RunConfig) -> str | None:
    """--prompt-style where it was given (a flag, a variable, a --config key), else None."""
    return cfg.prompt_style if "prompt_style" in cfg.model_fields_set else None


def export_style(cfg: RunConfig, how: Layout):
    """The layout the export stage will write, as the finetuned model will record it (``trained_layout``):
    the conversations' template, the prompt style, or for text (which has none) --prompt-style where given,
    else exit 2 as sft-job export refuses it."""
    if how.template is not None:
        return ChatStyle("chat", "", "", render=how.template.prompt)
    if how.data_format == "alpaca":
        return how.style
    if named_prompt_style(cfg) is None:
        raise ConfigError(
            f"--export gguf: {how.data_format} data has no prompt layout (no chat template) for the Modelfile's "
            "TEMPLATE: name the one to write with --prompt-style alpaca, phi3 or chat"
        )
    return how.style


def check_preference_data(cfg: RunConfig, tokenizer, how: Layout, context_length: int) -> Layout | None:
    """With --dpo, --dpo-data as the DPO stage reads it, before anything is written (not after the finetune):
    every entry a preference pair, both splits with pairs that fit the context, at least a batch of them, laid
    out in the style the stage will take from the finetuned model's record (``how``: the finetune's layout).
    Returns the DPO model's layout (None without --dpo)."""
    if not cfg.dpo:
        return None
    finetuned_with = trained_layout(cfg, how, tokenizer)["prompt_style"]
    name = dpo_prompt_style(named_prompt_style(cfg), finetuned_with)
    dpo = stage_config(
        cfg, "dpo", DPOConfig, prompt_style=name, train_on="assistant", **stage_model(cfg, cfg.model_dir)
    )
    splits = checked_splits(dpo, preference_problem)
    # the finetuned model carries the template it was trained with (a --chat-template file's too)
    style = ChatStyle("chat", "", "", render=how.template.prompt) if how.template and name == "chat" else None
    style = style or prompt_style(name, tokenizer)
    entries = splits.train + splits.val
    dpo_how = layout(dpo, splits.data_format, entries, tokenizer, style, splits.origin, pairs=True)
    splits = without_refused(splits, dpo_how)  # as the stage's load_inputs: a split --skip-invalid emptied is named
    limits = (dpo.allowed_max_length, context_length)
    path = Path(splits.where["train"])
    fitting_pairs(splits.train, splits.val, tokenizer, pair_style(dpo_how), limits, dpo.batch_size, path)
    return dpo_how


def run_pipeline(cfg: RunConfig, metrics: Metrics | None = None) -> dict:
    metrics = metrics or Metrics()
    pipeline = Pipeline(cfg, metrics)
    bind(run_id=pipeline.run_id)
    main = pipeline.roles.keeps_run
    publisher = MetricsPublisher(
        metrics,
        cfg.metrics_port if main else 0,
        cfg.pushgateway if main else None,
        pipeline.run_id,
        address=cfg.metrics_address,
        sd_dir=cfg.metrics_sd_dir if main else None,
    )
    pipeline.publisher = publisher
    with publisher:  # pushes at exit too, failure included
        result = pipeline.run()
        if main:
            metrics.last_success_timestamp_seconds.set_to_current_time()
            metrics.set_run_status(RunStatus.DONE)
    return result


def take_run(lock, metrics: Metrics, run_id: str, publisher: MetricsPublisher | None) -> None:
    """The run's lock, then the run's gauges say it runs (only then: a process refused the run id must not
    speak for it), pushed at once so that the Pushgateway knows, should the process die unheard."""
    lock.acquire()
    metrics.for_run(run_id, restart_count(os.environ))
    if publisher is not None:
        publisher.push()


def record_run_end(metrics: Metrics, exc: BaseException) -> None:
    """The run's status after ``exc``, once announced (its push must not stay "running"): to be retried
    where the exit code is 75, else failed."""
    if metrics.run_id:
        metrics.set_run_status(RunStatus.RETRY if exit_code_for(exc) == ExitCode.RETRY else RunStatus.FAILED)


def restart_count(environ) -> int | None:
    """Times the scheduler restarted this run: Slurm's requeues (``SLURM_RESTART_COUNT``, unset before the
    first), or JobSet's restart attempt (the chart's TrainJob passes its pod annotation as ``JOBSET_RESTART_ATTEMPT``);
    None where no scheduler says (a plain Kubernetes Job's pods carry no attempt number)."""
    if "SLURM_RESTART_COUNT" in environ or "SLURM_JOB_ID" in environ:
        name, text = "SLURM_RESTART_COUNT", environ.get("SLURM_RESTART_COUNT", "0")
    elif environ.get("JOBSET_RESTART_ATTEMPT"):
        name, text = "JOBSET_RESTART_ATTEMPT", environ["JOBSET_RESTART_ATTEMPT"]
    else:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        log.warning("restart_count_unreadable", variable=name, value=text[:40])
        return None
    return int(text)
