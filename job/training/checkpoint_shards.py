"""A sharded (``--sharding fsdp``) model's checkpoint as each process's shards: safetensors and JSON only.

    model-{rank}.safetensors              this process's rows of each parameter that trains (FSDP2
                                          shards dimension 0), by name
    optimizer-{kind}-{rank}.safetensors   its rows of each of AdamW's moments, by parameter index (step whole)
    shards-{rank}.json                    {"world": N, "rank": r, "tensors": {"model/NAME" or "KIND/INDEX":
                                          {"shape": whole shape, "offset": first row}}}

torch's distributed checkpoint keeps its metadata in a pickle; these files are written here instead, so
nothing is ever unpickled. Loading (``Shards``) lists every process's rows from the files' headers, checked
to cover each tensor exactly once, and then reads from each file only the rows this process holds in the
group it runs in (safetensors' slices of the mapped file), so a checkpoint of N processes resumes on M and
no process ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from job.training.sharding import placed_like


class ShardsError(Exception):
    """The shards of a checkpoint do not join into whole tensors (the message says which tensor; ``file``:
    the checkpoint's file where that shows, so the checkpoint is skipped naming it)."""

    def __init__(self, message: str, file: str = ""):
        super().__init__(message)
        self.file = file


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's rows of ``tensor`` (a DTensor sharded on dimension 0) and the first row's index;
    a plain tensor whole, from row 0."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    local = tensor.to_local()
    start, stop = target_rows(tensor)
    if local.shape[0] != stop - start:
        raise ShardsError(f"a shard of shape {list(local.shape)} is not rows of a {list(tensor.shape)} tensor")
    return local, start


def target_rows(like: torch.Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the whole tensor that this process holds of ``like``: a DTensor's
    by its mesh and placements (rows only: FSDP2 shards dimension 0), a plain tensor's all."""
    if not isinstance(like, DTensor):
        return 0, like.shape[0] if like.dim() else 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    if not shape or list(shape[1:]) != list(like.shape[1:]) or any(offset[1:]):
        raise ShardsError(f"a shard of shape {list(shape)} is not rows of a {list(like.shape)} tensor")
    return offset[0], offset[0] + shape[0]


def write_shards(
    folder: Path,
    rank: int,
    world: int,
    parameters: dict[str, torch.Tensor],
    optimizer: dict[str, dict[str, torch.Tensor]],
) -> None:
    """This process's rows of ``parameters`` (by name) and of the ``optimizer``'s state (by kind, then
    parameter index) into ``folder``, with where each sits in its whole tensor."""
    entries: dict[str, dict] = {}

    def rows_of(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in tensors.items():
            rows, offset = local_rows(tensor.detach())
            out[key] = rows.cpu().contiguous()
            entries[f"{prefix}/{key}"] = {"shape": list(tensor.shape), "offset": offset}
        return out

    save_file(rows_of("model", parameters), str(folder / f"model-{rank}.safetensors"))
    for kind, tensors in optimizer.items():
        save_file(rows_of(kind, tensors), str(folder / f"optimizer-{kind}-{rank}.safetensors"))
    (folder / f"shards-{rank}.json").write_text(json.dumps({"world": world, "rank": rank, "tensors": entries}))


@dataclass(frozen=True)
class Piece:
    """One process's rows of a tensor: ``rows`` rows from row ``offset``, stored as ``name`` in ``file``."""

    file: Path
    name: str
    offset: int
    rows: int
    trailing: list[int]  # the shape of a row
    dtype: str  # as safetensors' header names it


class Shards(contextlib.ExitStack):
    """Every process's shards of a checkpoint in ``folder`` (``files``: its verified index), listed from
    the files' headers and checked to join (each row of each tensor exactly once) before anything is
    read; ``placed`` then reads only the rows this process holds. Keys: ``model/NAME``, ``KIND/INDEX``."""

    def __init__(self, folder: Path, files: dict[str, str]):
        super().__init__()
        self.shapes: dict[str, list[int]] = {}
        self.pieces: dict[str, list[Piece]] = {}
        self._opened: dict[Path, object] = {}
        try:
            self._list_all(folder, files)
        except BaseException:
            self.close()
            raise

    def _list_all(self, folder: Path, files: dict[str, str]) -> None:
        world = json.loads((folder / "shards-0.json").read_text())["world"]
        for rank in range(world):
            if f"shards-{rank}.json" not in files:
                raise ShardsError(
                    f"shards-0.json says {world} processes wrote it; the index lists no shards-{rank}.json",
                    "shards-0.json",
                )
            listing = json.loads((folder / f"shards-{rank}.json").read_text())
            if listing["world"] != world or listing["rank"] != rank:
                raise ShardsError(
                    f"shards-{rank}.json says rank {listing['rank']} of {listing['world']}", f"shards-{rank}.json"
                )
            ending = f"-{rank}.safetensors"
            for name in sorted(n for n in files if n.endswith(ending) and not n.startswith("rng-")):
                prefix = "model" if name.startswith("model-") else name[len("optimizer-") : -len(ending)]
                self._list(folder / name, prefix, listing)
        for key, found in self.pieces.items():
            found.sort(key=lambda piece: piece.offset)
            _check_joins(key, self.shapes[key], found)

    def _list(self, file: Path, prefix: str, listing: dict) -> None:
        """The pieces of ``file`` (one process's, of kind ``prefix``) where its ``listing`` places them."""
        opened = self._open(file)
        for name in opened.keys():
            key, entry = f"{prefix}/{name}", listing["tensors"].get(f"{prefix}/{name}")
            listed = f"shards-{listing['rank']}.json"
            if entry is None:
                raise ShardsError(f"{file.name} holds {name[:60]!r}, which {listed} does not place", file.name)
            if not _is_place(entry):
                raise ShardsError(
                    f"{listed} places {key[:60]} at {str(entry)[:80]}, not a first row and a shape", listed
                )
            if self.shapes.setdefault(key, entry["shape"]) != entry["shape"]:
                raise ShardsError(f"{key[:60]} has two shapes across the shards", listed)
            sliced = opened.get_slice(name)
            shape, dtype = sliced.get_shape(), sliced.get_dtype()
            if bool(shape) != bool(entry["shape"]):  # a scalar where rows are said to be, or rows for a scalar
                raise ShardsError(f"the shards of {key[:60]} do not join: a piece of shape {shape}", file.name)
            if self.pieces.get(key) and self.pieces[key][0].dtype != dtype:
                raise ShardsError(
                    f"the shards of {key[:60]} do not join: {dtype} rows beside {self.pieces[key][0].dtype}",
                    file.name,
                )
            piece = Piece(file, name, entry["offset"], shape[0] if shape else 0, shape[1:], dtype)
            self.pieces.setdefault(key, []).append(piece)

    def _open(self, file: Path):
        if file not in self._opened:
            self._opened[file] = self.enter_context(safe_open(str(file), framework="pt"))
        return self._opened[file]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the whole tensor ``key``, read from the pieces that hold them (a scalar:
        the first process's, which every process holds whole). A range within one piece is a view of the
        privately mapped file: pages are read as they are touched, and writes (AdamW's) never reach it."""
        pieces = self.pieces[key]
        if not self.shapes[key]:
            return self._open(pieces[0].file).get_tensor(pieces[0].name)
        if stop <= start:  # no rows here (more processes than rows), in the tensor's dtype
            return self._open(pieces[0].file).get_slice(pieces[0].name)[0:0]
        parts = []
        for piece in pieces:
            first, last = max(start, piece.offset), min(stop, piece.offset + piece.rows)
            if first < last:
                parts.append(self._open(piece.file).get_slice(piece.name)[first - piece.offset : last - piece.offset])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def placed(self, key: str, like: torch.Tensor | None) -> torch.Tensor:
        """``key`` as ``like`` holds it: with fsdp, a DTensor of only this process's rows (read from the
        files, nothing sent); a plain ``like``, or None, the whole tensor."""
        if like is None or not self.shapes[key]:
            return self.rows(key, 0, self.shapes[key][0] if self.shapes[key] else 0)
        start, stop = target_rows(like)
        rows = self.rows(key, start, stop)
        if not isinstance(like, DTensor):
            return rows
        mesh, placements = like.device_mesh, like.placements
        return DTensor.from_local(rows.to(like.device), mesh, placements, shape=like.shape, stride=like.stride())


class WholeTensors:
    """A checkpoint's whole tensors (the main process's files, by the keys ``Shards`` uses), with the
    same ``shapes`` and ``placed``: with fsdp each process cuts its shard of them."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.shapes = {key: list(tensor.shape) for key, tensor in tensors.items()}

    def __enter__(self) -> WholeTensors:
        return self

    def __exit__(self, *_) -> None:
        self.tensors = {}

    def placed(self, key: str, like: torch.Tensor | None) -> torch.Tensor:
        tensor = self.tensors[key]
        return tensor if like is None or not tensor.dim() else placed_like(tensor, like)


def read_shards(folder: Path, files: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The whole parameters (by name) and optimizer state (by kind, then index) from every process's
    shards in ``folder`` (``files``: its verified index): each tensor's rows joined."""
    parameters: dict[str, torch.Tensor] = {}
    optimizer: dict[str, dict] = {}
    with Shards(folder, files) as shards:
        for key, shape in shards.shapes.items():
            kind, _, index = key.partition("/")
            whole = shards.rows(key, 0, shape[0] if shape else 0)
            if kind == "model":
                parameters[index] = whole
            else:
                optimizer.setdefault(kind, {})[index] = whole
    return parameters, optimizer


def _is_place(entry: object) -> bool:
    """A listing's entry is ``{"shape": [ints], "offset": int}`` (a tampered one is refused, not a crash)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
        return False
    return all(type(n) is int and n >= 0 for n in [entry.get("offset"), *entry["shape"]])


def _check_joins(key: str, shape: list[int], pieces: list[Piece]) -> None:
    """``pieces`` (by offset) hold each row of the whole tensor of ``shape`` exactly once."""
    if not shape:  # a scalar (AdamW's step) every process holds whole
        return
    row = 0
    for piece in pieces:
        if piece.offset != row or piece.trailing != shape[1:]:
            said = f"the shards of {key[:60]} do not join: rows from {piece.offset} where {row} was next"
            raise ShardsError(said, piece.file.name)
        row += piece.rows
    if row != shape[0]:
        raise ShardsError(f"the shards of {key[:60]} hold {row} of its {shape[0]} rows", pieces[-1].file.name)
