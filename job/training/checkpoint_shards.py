"""A sharded (``--sharding fsdp``) model's checkpoint as each process's shards: safetensors and JSON only.

    model-{rank}.safetensors              this process's rows of each parameter that trains (FSDP2
                                          shards dimension 0), by name
    optimizer-{kind}-{rank}.safetensors   its rows of each of AdamW's moments, by parameter index (step whole)
    shards-{rank}.json                    {"world": N, "rank": r, "tensors": {"model/NAME" or "KIND/INDEX":
                                          {"shape": whole shape, "offset": first row}}}

torch's distributed checkpoint keeps its metadata in a pickle; these files are written here instead, so
nothing is ever unpickled. Loading reads every process's files and joins each tensor's rows in order,
checked to cover it exactly once; each process then cuts its own shard for the group it runs in, so a
checkpoint of N processes resumes on M.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor


class ShardsError(Exception):
    """The shards of a checkpoint do not join into whole tensors (the message says which)."""


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's rows of ``tensor`` (a DTensor sharded on dimension 0) and the first row's index;
    a plain tensor whole, from row 0."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(local.shape) != tuple(shape) or any(offset[1:]):
        raise ShardsError(f"a shard of shape {list(local.shape)} is not rows of a {list(tensor.shape)} tensor")
    return local, offset[0] if offset else 0


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


def read_shards(folder: Path, files: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The whole parameters (by name) and optimizer state (by kind, then index) from every process's
    shards in ``folder`` (``files``: its verified index)."""
    world = json.loads((folder / "shards-0.json").read_text())["world"]
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    shapes: dict[str, list[int]] = {}
    for rank in range(world):
        listing = json.loads((folder / f"shards-{rank}.json").read_text())
        if listing["world"] != world or listing["rank"] != rank:
            raise ShardsError(f"shards-{rank}.json says rank {listing['rank']} of {listing['world']}")
        for name in sorted(n for n in files if n.endswith(f"-{rank}.safetensors") and not n.startswith("rng-")):
            prefix = "model" if name.startswith("model-") else name[len("optimizer-") : -len(f"-{rank}.safetensors")]
            for key, rows in load_file(folder / name).items():
                entry = listing["tensors"].get(f"{prefix}/{key}")
                if entry is None:
                    raise ShardsError(f"{name} holds {key[:60]!r}, which shards-{rank}.json does not place")
                if shapes.setdefault(f"{prefix}/{key}", entry["shape"]) != entry["shape"]:
                    raise ShardsError(f"{prefix}/{key[:60]} has two shapes across the shards")
                pieces.setdefault(f"{prefix}/{key}", []).append((entry["offset"], rows))
    whole = {key: _joined(key, shapes[key], found) for key, found in pieces.items()}
    parameters = {k[len("model/") :]: t for k, t in whole.items() if k.startswith("model/")}
    optimizer: dict[str, dict] = {}
    for key, tensor in whole.items():
        kind, _, index = key.partition("/")
        if kind != "model":
            optimizer.setdefault(kind, {})[index] = tensor
    return parameters, optimizer


def _joined(key: str, shape: list[int], found: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The rows in ``found`` joined in order into the whole tensor of ``shape``: each row exactly once."""
    if not shape:  # a scalar (AdamW's step) every process holds whole
        return found[0][1]
    row, parts = 0, []
    for offset, rows in sorted(found, key=lambda f: f[0]):
        if offset != row or list(rows.shape[1:]) != shape[1:]:
            raise ShardsError(f"the shards of {key[:60]} do not join: rows from {offset} where {row} was next")
        parts.append(rows)
        row += rows.shape[0]
    if row != shape[0]:
        raise ShardsError(f"the shards of {key[:60]} hold {row} of its {shape[0]} rows")
    return torch.cat(parts)
