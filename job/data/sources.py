"""Where a dataset's entries come from: a file (JSON, JSON Lines or Parquet) cut 85/10/5, or a folder of
``train``/``validation``/``test`` files used as the splits; columns renamed by ``--data-fields``; every
entry checked and a bad one named (file, entry, field)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from job.core.errors import ConfigError
from job.core.observability import get_logger
from job.core.parsing import first_refused, non_finite, short
from job.data.formats import Layout, detect_format, format_problem
from job.data.instructions import (
    MAX_DATASET_BYTES,
    MAX_FIELD_CHARS,
    DataError,
    check_field_lengths,
    entry_problem,
    parse_entries,
    resolve_data,
    split_entries,
)
from job.data.preference import preference_problem
from job.models.origin import HubAccess
from job.storage.store import sha256_file, sha256_files

log = get_logger(__name__)
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation"}
SPLIT_ALIASES |= {"dev": "validation", "test": "test"}  # as the hub's viewer tells them
FILE_TYPES = (".json", ".jsonl", ".parquet")
FIELD_TARGETS = ("instruction", "input", "output", "prompt", "chosen", "rejected")
HUB_PREFIX = "hf://datasets/"
HUB_DATASET = re.compile(r"hf://datasets/([A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@([\w.-][\w./-]{0,199}))?")
MAX_PARQUET_EXPANSION = 8
"""A Parquet file's data, uncompressed, may be this many times the JSON bound (its text, decoded)."""


# --- reading one file -----------------------------------------------------------------------------


def read_rows(path: Path) -> list:
    """A file's rows: Parquet by its suffix (``.parquet``), else JSON or JSON Lines."""
    if path.suffix == ".parquet":
        return parquet_rows(path)
    return parse_entries(path)


def parquet_rows(path: Path) -> list[dict]:
    """A Parquet file's rows as dicts (pyarrow), bounded as a JSON dataset is: the file's size, and its data's
    size uncompressed as its footer states it, before any column is read. A file pyarrow cannot read
    (truncated, not Parquet, a damaged page) is one line naming it."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"dataset {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"dataset {path} is not readable: {exc.strerror or exc}") from None
    if size > MAX_DATASET_BYTES:
        raise DataError(f"dataset {path} is larger than {MAX_DATASET_BYTES >> 20} MB")
    try:
        with pq.ParquetFile(path) as parquet:
            meta = parquet.metadata
            expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            if expanded > MAX_PARQUET_EXPANSION * MAX_DATASET_BYTES:
                raise DataError(f"dataset {path} holds {expanded >> 20} MB of data uncompressed: more than we read")
            rows = parquet.read().to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        reason = short(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[1:-1]
        raise DataError(f"dataset {path} is not a Parquet file we can read: {reason}") from None
    if not rows:
        raise DataError(f"dataset {path} has no entries")
    where = first_refused(rows, non_finite) if any(kind in str(meta.schema) for kind in ("float", "double")) else None
    if where is not None:
        raise DataError(f"dataset {path}: {where}: give a finite number or null")
    if expanded > MAX_FIELD_CHARS:  # else no field can be that long
        check_field_lengths(path, rows)
    return rows


# --- other column names ---------------------------------------------------------------------------


def parse_fields(spec: str | None) -> dict[str, str]:
    """``--data-fields instruction=question,input=context,output=response``: each field the entries' column
    that holds it. A malformed spec is a ConfigError (exit 2) naming the flag."""
    if spec is None:
        return {}
    fields: dict[str, str] = {}
    for part in spec.split(","):
        target, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not target or not column:
            raise ConfigError(f"--data-fields {spec!r}: {part.strip()!r} is not FIELD=COLUMN")
        if target not in FIELD_TARGETS:
            raise ConfigError(f"--data-fields {spec!r}: {target!r} is not one of {', '.join(FIELD_TARGETS)}")
        if target in fields:
            raise ConfigError(f"--data-fields {spec!r}: {target!r} is named twice")
        fields[target] = column
    return fields


def renamed(entry, fields: dict[str, str]) -> tuple[object, str | None]:
    """``entry`` with each field named taken from its column, all read from the entry as it was (so
    ``instruction=output,output=instruction`` swaps them, and several fields may read one column); a field not
    named reads its own column, and a column read under another name is dropped unless it is a field's own. Or
    the entry as it is and why not: a column ``--data-fields`` names that the entry lacks."""
    if not fields or not isinstance(entry, dict):
        return entry, None
    for target, column in fields.items():
        if column not in entry:
            return entry, f"column {column!r} (--data-fields {target}={column}) is missing"
    columns = set(fields.values())
    out = {k: v for k, v in entry.items() if k not in columns or k in FIELD_TARGETS}
    out.update({target: entry[column] for target, column in fields.items()})
    return out, None


def checked_entries(
    path: Path,
    rows: list,
    skip_invalid: bool,
    check: Callable = entry_problem,
    fields: dict | None = None,
    data_format: str | None = None,
) -> tuple[str, list[dict]]:
    """``rows`` renamed, their format (``data_format``, else told from their keys: job/data/formats.py) and
    each checked as that format's (alpaca's by ``check``, ``input`` filled in as "" where absent); a bad one is
    an error naming the file, the entry and the field."""
    data_format, entries, _rows = checked_rows(path, rows, skip_invalid, check, fields, data_format)
    return data_format, entries


def checked_rows(
    path: Path,
    rows: list,
    skip_invalid: bool,
    check: Callable = entry_problem,
    fields: dict | None = None,
    data_format: str | None = None,
) -> tuple[str, list[dict], list[int]]:
    """``checked_entries``, and the row each entry kept was (``--skip-invalid`` may drop some), so a later
    check (the chat template's) names an entry as these checks do."""
    pairs = [renamed(row, fields or {}) for row in rows]
    if check is not preference_problem:
        refuse_preference_pairs(path, next((entry for entry, problem in pairs if problem is None), None))
    if not skip_invalid:
        _raise_first(path, pairs)
    named = [entry for entry, problem in pairs if problem is None]
    data_format = data_format or (detect_format(named, path) if named else "alpaca")
    entries, kept, skipped = [], [], 0
    for index, (entry, problem) in enumerate(pairs):
        problem = problem or format_problem(data_format, entry, check)
        if problem is None:
            entries.append({**entry, "input": entry.get("input", "")} if data_format == "alpaca" else entry)
            kept.append(index)
        elif skip_invalid:
            skipped += 1
        else:
            raise DataError(f"dataset {path}: entry {index}: {problem} (--skip-invalid drops such entries)")
    if skipped:
        log.warning("dataset_entries_skipped", count=skipped, path=str(path))
    if not entries:
        raise DataError(f"dataset {path} has no valid entries")
    return data_format, entries, kept


# A response to train on: an entry with one of these is instruction data, whatever else it holds (the book's
# preference file has output besides chosen and rejected, and finetunes as the book's).
SFT_KEYS = {"output", "messages", "completion", "text"}


def refuse_preference_pairs(path: Path, first) -> None:
    """Preference pairs (TRL's prompt/chosen/rejected, as text or turns) where instruction data belongs: a
    DataError naming the file, what it holds and where it goes (DPO), not a field missing from every entry."""
    if not isinstance(first, dict) or not {"chosen", "rejected"} <= first.keys() or first.keys() & SFT_KEYS:
        return
    shape = "conversational" if isinstance(first["chosen"], list) else "text"
    prompt = "prompt, chosen, rejected" if "prompt" in first else "chosen, rejected with an implicit prompt"
    raise DataError(
        f"dataset {path} is preference data ({prompt}: TRL's {shape} shape), which DPO trains on, not the finetune "
        f"or generate: give it as --dpo-data with sft-job run --dpo, or as --data to sft-job dpo"
    )


def _raise_first(path: Path, pairs: list[tuple[object, str | None]]) -> None:
    """The first entry ``--data-fields`` cannot rename, as the error naming it."""
    for index, (_entry, problem) in enumerate(pairs):
        if problem is not None:
            raise DataError(f"dataset {path}: entry {index}: {problem} (--skip-invalid drops such entries)")


# --- a file or a folder of splits -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A dataset as found: one file (``whole``, cut 85/10/5) or each split's files (a folder's; a hub split
    may come in shards, read in order)."""

    label: str
    """What the user named (the file, the folder, the hub dataset)."""
    whole: tuple[Path, ...] = ()
    splits: tuple[tuple[str, tuple[Path, ...]], ...] = ()

    def files(self) -> list[Path]:
        return list(self.whole) or [p for _, paths in self.splits for p in paths]

    def split(self, name: str) -> tuple[Path, ...]:
        return dict(self.splits).get(name, ())


def parse_hub_dataset(data: str) -> tuple[str, str] | None:
    """``hf://datasets/ORG/NAME[@REVISION]`` as (repository, revision; ``main`` by default), None for any other
    --data; a malformed one is a ConfigError (exit 2) naming the flag."""
    if not data.startswith(HUB_PREFIX):
        return None
    match = HUB_DATASET.fullmatch(data)
    if match is None or ".." in data:
        raise ConfigError(
            f"--data {short(data)}: a hub dataset is hf://datasets/ORG/NAME or hf://datasets/ORG/NAME@REVISION"
        )
    return match.group(1), match.group(2) or "main"


def resolve_source(
    data: str,
    cache: str | Path,
    base_url: str | None = None,
    data_split: str | None = None,
    access: HubAccess | None = None,
) -> Source:
    """``--data`` as a Source: a hub dataset's files fetched into the cache at a pinned commit (from the hub
    ``access`` names, or ``base_url``'s mirror), a URL's file fetched, or a local file or folder."""
    if parse_hub_dataset(data) is not None:
        from job.data.hub_dataset import fetch_hub_dataset  # imports this module: called, not imported, at the top

        return hub_source(data, fetch_hub_dataset(data, Path(cache), data_split, access, base_url), data_split)
    return local_source(resolve_data(data, cache, base_url), data, data_split)


def hub_source(label: str, by_split: dict[str, tuple[Path, ...]], data_split: str | None) -> Source:
    """A hub dataset's fetched files by split (shards in order) as a Source: ``--data-split``'s alone as the
    whole dataset, else its splits (a train split needed)."""
    if data_split is not None:
        if not by_split.get(data_split):
            have = ", ".join(s for s in SPLITS if by_split.get(s)) or "none"
            raise DataError(f"hub dataset {label} has no {data_split} split (--data-split; it has: {have})")
        return Source(label, whole=by_split[data_split])
    if not by_split.get("train"):
        raise DataError(f"hub dataset {label} has no train split among its files (--data-split names another)")
    return Source(label, splits=tuple((s, by_split[s]) for s in SPLITS if by_split.get(s)))


def split_of(name: str) -> str | None:
    """The split a hub file's path names (``data/train-00000-of-00002.parquet``, ``test.jsonl``), as the
    hub's own viewer tells them (``valid``, ``val`` and ``dev`` are validation), or None."""
    path = PurePosixPath(name)
    if path.suffix not in FILE_TYPES:
        return None
    for part in (path.name, *reversed(path.parts[:-1])):
        word = re.split(r"[-_.]", part, maxsplit=1)[0].lower()
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


def files_by_split(names: list[str], label: str) -> tuple[dict[str, list[str]], list[str]]:
    """A folder's or hub dataset's data files (paths within it) by the split each names (``split_of``; shards
    in name order), and those naming none, left out as the hub leaves them (a lone data file naming no split
    is the train split, as the hub's). A split is one file or its shards: a file named for the split alone
    (``train.json``) beside another of that split (``train.jsonl``, ``data/train-00000-of-00002.parquet``; or
    ``dev.jsonl`` beside ``validation.jsonl``) is a DataError naming both."""
    by_split: dict[str, list[str]] = {}
    for name in names:
        if PurePosixPath(name).suffix in FILE_TYPES:
            by_split.setdefault(split_of(name) or "", []).append(name)
    by_split = {split: sorted(files) for split, files in by_split.items()}  # the splits in the order first named
    unnamed = by_split.pop("", [])
    if not by_split and len(unnamed) == 1:
        return {"train": unnamed}, []
    for split, files in by_split.items():
        whole = next((f for f in files if PurePosixPath(f).stem.lower() in SPLIT_ALIASES), None)
        if whole is not None and len(files) > 1:
            other = next(f for f in files if f != whole)
            raise DataError(f"{label} has two {split} files, {whole} and {other}: keep one")
    return by_split, unnamed


def local_source(path: Path, label: str | None = None, data_split: str | None = None) -> Source:
    """``path`` as a dataset: a folder's split files (``--data-split`` picks one of them as the whole dataset),
    else the file itself."""
    label = label or str(path)
    if not path.is_dir():
        if data_split is not None:
            raise ConfigError(f"--data-split {data_split} names a split of a folder or a hub dataset, not of {label}")
        return Source(label, whole=(path,))
    found = folder_splits(path)
    if data_split is None:
        return Source(label, splits=tuple((s, found[s]) for s in SPLITS if s in found))
    if data_split not in found:
        raise DataError(f"dataset folder {label} has no {data_split} file (--data-split {data_split})")
    return Source(label, whole=found[data_split])


def folder_splits(folder: Path) -> dict[str, tuple[Path, ...]]:
    """A folder's data files (``.json``, ``.jsonl`` or ``.parquet``, in it or below it; hidden ones not) by
    split, named as a hub dataset's are (``files_by_split``: ``dev``/``valid``/``val`` are validation, shards
    read in order; a file naming no split is left out, and logged); a folder without a train file is a
    DataError naming it."""
    found = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    names = sorted(p.as_posix() for p in found if not any(part.startswith(".") for part in p.parts))
    by_split, unnamed = files_by_split(names, f"dataset folder {folder}")
    if unnamed:
        log.warning("dataset_files_without_a_split", folder=str(folder), files=unnamed[:20], count=len(unnamed))
    if not by_split.get("train"):
        kinds = ", ".join(f"train{suffix}" for suffix in FILE_TYPES)
        raise DataError(f"dataset folder {folder} has no train file ({kinds}); validation and test files are optional")
    return {split: tuple(folder / n for n in files) for split, files in by_split.items()}


def source_digest(source: Source) -> str:
    """The sha256 a run binds its data by: a file's own (as before folders), else one over each split's files
    (their split, names and contents), so a changed, added or removed file changes it."""
    if len(source.whole) == 1:
        return sha256_file(source.whole[0])
    files = [("", p) for p in source.whole] or [(split, p) for split, paths in source.splits for p in paths]
    digests = sha256_files([p for _, p in files])
    listing = "".join(f"{split}\0{p.name}\0{d}\n" for (split, p), d in zip(files, digests, strict=True))
    return hashlib.sha256(listing.encode()).hexdigest()


@dataclass
class Splits:
    """A dataset's (train, test, validation) entries, and the file each came from (for messages)."""

    train: list[dict]
    test: list[dict]
    val: list[dict]
    where: dict[str, str]
    data_format: str = "alpaca"
    """The entries' format (job/data/formats.py)."""
    label: str = ""
    """The dataset as errors name it: its file, folder or hub dataset."""
    files: tuple[tuple[Path, list[dict], list[int]], ...] = ()
    """Each file's checked entries and the row each was in it."""

    def origin(self, entry: dict) -> str:
        """Where ``entry`` (one of the splits') came from, as the entry checks name it: its file and row."""
        for path, entries, rows in self.files:
            row = next((rows[i] for i, e in enumerate(entries) if e is entry), None)
            if row is not None:
                return f"dataset {path}: entry {row}"
        return f"dataset {self.label}: an entry"


def load_splits(
    source: Source,
    skip_invalid: bool = False,
    check: Callable = entry_problem,
    fields: dict | None = None,
    shuffle_seed: int | None = None,
    need: tuple[str, ...] = (),
    data_format: str | None = None,
) -> Splits:
    """Each split's checked entries: a file's cut 85/10/5 (the book's), a folder's as its files give them; every
    file of one format (the first file's, unless ``data_format`` names it). A split in ``need`` that the folder
    lacks is a DataError naming the folder and the split."""
    files = source.whole or [p for split in SPLITS for p in source.split(split)]
    loaded: dict[Path, list[dict]] = {}
    checked = []
    for path in files:
        data_format, loaded[path], rows = checked_rows(path, read_rows(path), skip_invalid, check, fields, data_format)
        checked.append((path, loaded[path], rows))
    if source.whole:
        entries = [e for p in source.whole for e in loaded[p]]
        train, test, val = split_entries(entries, shuffle_seed)
        where = dict.fromkeys(SPLITS, ", ".join(map(str, source.whole)))
        return Splits(train, test, val, where, data_format, source.label, tuple(checked))
    by_split, where = {}, {}
    for split in SPLITS:
        paths = source.split(split)
        if not paths and split in need:
            raise DataError(f"dataset {source.label} has no {split} file: the stage needs its {split} split")
        by_split[split] = [e for p in paths for e in loaded[p]]
        where[split] = ", ".join(str(p) for p in paths) or source.label
    found = by_split["train"], by_split["test"], by_split["validation"]
    return Splits(*found, where, data_format, source.label, tuple(checked))


def without_refused(splits: Splits, how: Layout, names: tuple[str, ...] = ("train", "validation")) -> Splits:
    """``splits`` without the entries the chat template refused (``--skip-invalid``: ``how.refused``); a split
    of ``names`` that loses every entry is a DataError naming it and its file."""
    kept = {"train": how.kept(splits.train), "val": how.kept(splits.val), "test": how.kept(splits.test)}
    for name in names:
        attribute = "val" if name == "validation" else name
        if getattr(splits, attribute) and not kept[attribute]:
            raise DataError(
                f"dataset {splits.where[name]}: the chat template refused every entry of its {name} split "
                f"({len(getattr(splits, attribute))}; --skip-invalid dropped them): fix the entries or the template"
            )
    return replace(splits, **kept)


def dataset_splits(cfg, check: Callable = entry_problem, need: tuple[str, ...] = ()) -> Splits:
    """The splits of the dataset a stage's settings name (``DataConfig``'s data, data_split, data_fields,
    data_format; the cache and mirror it is fetched through)."""
    source = resolve_source(cfg.data, Path(cfg.cache), cfg.base_url, cfg.data_split, cfg)
    fields = parse_fields(cfg.data_fields)
    return load_splits(source, cfg.skip_invalid, check, fields, cfg.shuffle_seed, need, cfg.data_format)
