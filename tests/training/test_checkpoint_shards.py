"""fsdp's checkpoint shards joined back: every process's rows, each exactly once, into the whole tensors;
and read back in part: each process of another number reads only the rows it holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from job.storage.store import sha256_file
from job.training.checkpoint_files import INDEX, checkpoint_problem, index_text
from job.training.checkpoint_shards import Shards, ShardsError, read_shards, write_shards


def write_by_hand(folder, whole: torch.Tensor, cuts: list[int], places: list[int] | None = None) -> dict[str, str]:
    """``whole``'s rows cut at ``cuts`` into one shard a process (``places``: the offsets each claims)."""
    bounds = [0, *cuts, whole.shape[0]]
    world = len(bounds) - 1
    files = {}
    for rank in range(world):
        rows = whole[bounds[rank] : bounds[rank + 1]].contiguous()
        offset = bounds[rank] if places is None else places[rank]
        save_file({"w": rows}, str(folder / f"model-{rank}.safetensors"))
        save_file({"0": rows * 2}, str(folder / f"optimizer-exp_avg-{rank}.safetensors"))
        save_file({"0": torch.tensor(3.0)}, str(folder / f"optimizer-step-{rank}.safetensors"))
        place = {"shape": list(whole.shape), "offset": offset}
        tensors = {"model/w": place, "exp_avg/0": place, "step/0": {"shape": [], "offset": 0}}
        (folder / f"shards-{rank}.json").write_text(json.dumps({"world": world, "rank": rank, "tensors": tensors}))
        for name in (f"model-{rank}.safetensors", f"optimizer-exp_avg-{rank}.safetensors", f"shards-{rank}.json"):
            files[name] = "0" * 64
        files[f"optimizer-step-{rank}.safetensors"] = "0" * 64
    return files


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cuts=st.lists(st.integers(0, 9), max_size=4))
def test_rows_cut_anywhere_join_back_into_the_whole_tensor(tmp_path_factory, rows, cuts):
    folder = tmp_path_factory.mktemp("shards")
    whole = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    files = write_by_hand(folder, whole, sorted(min(c, rows) for c in cuts))  # empty shards too
    parameters, optimizer = read_shards(folder, files)
    assert torch.equal(parameters["w"], whole)
    assert torch.equal(optimizer["exp_avg"]["0"], whole * 2) and optimizer["step"]["0"].item() == 3.0


@pytest.mark.parametrize(
    ("places", "said"),
    [
        ([0, 2, 2], "shards of model/w do not join"),
        ([0, 3, 5], "shards of model/w do not join"),
        ([1, 3, 5], "of model/w do not"),
    ],
    ids=["overlap", "gap", "no-first-row"],
)
def test_rows_that_overlap_or_leave_a_gap_are_refused(tmp_path, places, said):
    files = write_by_hand(tmp_path, torch.ones(6, 2), [2, 4], places)
    with pytest.raises(ShardsError, match=said):
        read_shards(tmp_path, files)


def test_a_missing_process_or_a_rank_that_is_not_its_own_is_refused(tmp_path):
    files = write_by_hand(tmp_path, torch.ones(6, 2), [3])
    listing = json.loads((tmp_path / "shards-1.json").read_text())
    (tmp_path / "shards-1.json").write_text(json.dumps(listing | {"rank": 0}))
    with pytest.raises(ShardsError, match="says rank 0 of 2"):
        read_shards(tmp_path, files)
    (tmp_path / "shards-1.json").write_text(json.dumps(listing))
    short = {n: d for n, d in files.items() if not n.endswith("-1.safetensors")}  # process 1's rows absent
    with pytest.raises(ShardsError, match="hold 3 of its 6 rows"):
        read_shards(tmp_path, short)
    for rank in (0, 1):  # both listings say 3 processes wrote it
        (tmp_path / f"shards-{rank}.json").write_text(json.dumps(listing | {"rank": rank, "world": 3}))
    with pytest.raises(ShardsError, match="says 3 processes wrote it; the index lists no shards-2.json"):
        read_shards(tmp_path, files)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 9), max_size=4),
    wanted=st.tuples(st.integers(0, 9), st.integers(0, 9)),
)
def test_any_range_of_rows_is_read_from_the_pieces_that_hold_it(tmp_path_factory, rows, cuts, wanted):
    folder = tmp_path_factory.mktemp("shards")
    whole = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    files = write_by_hand(folder, whole, sorted(min(c, rows) for c in cuts))
    start, stop = sorted(min(w, rows) for w in wanted)
    with Shards(folder, files) as shards:
        got = shards.rows("model/w", start, stop)
        assert got.dtype == torch.float32 and torch.equal(got, whole[start:stop])
        assert torch.equal(shards.rows("exp_avg/0", start, stop), whole[start:stop] * 2)
        assert torch.equal(shards.placed("model/w", torch.empty(rows, 3)), whole)  # a plain tensor: all of it
        assert shards.placed("step/0", None).item() == 3.0


def test_rows_of_another_shape_or_a_scalar_for_rows_are_refused_naming_the_tensor(tmp_path):
    files = write_by_hand(tmp_path, torch.ones(6, 2), [3])
    save_file({"w": torch.ones(3, 4)}, str(tmp_path / "model-1.safetensors"))  # rows 3.. of another width
    with pytest.raises(ShardsError, match="shards of model/w do not join: rows from 3"):
        Shards(tmp_path, files)
    save_file({"w": torch.tensor(1.0)}, str(tmp_path / "model-1.safetensors"))
    with pytest.raises(ShardsError, match=r"shards of model/w do not join: a piece of shape \[\]"):
        Shards(tmp_path, files)


@pytest.mark.parametrize(
    ("place", "said"),
    [
        ({"offset": "3"}, "places model/w at"),
        ({"offset": -3}, "places model/w at"),
        ({"shape": [6.0, 2]}, "not a first row"),
    ],
    ids=["offset-text", "offset-negative", "shape-float"],
)
def test_a_listing_whose_place_is_not_a_row_and_a_shape_is_refused(tmp_path, place, said):
    files = write_by_hand(tmp_path, torch.ones(6, 2), [3])
    listing = json.loads((tmp_path / "shards-1.json").read_text())
    listing["tensors"]["model/w"] |= place
    (tmp_path / "shards-1.json").write_text(json.dumps(listing))
    with pytest.raises(ShardsError, match=said):
        Shards(tmp_path, files)


def test_rows_of_another_dtype_are_refused_not_promoted(tmp_path):
    files = write_by_hand(tmp_path, torch.ones(6, 2), [3])
    save_file({"w": torch.ones(3, 2, dtype=torch.int64)}, str(tmp_path / "model-1.safetensors"))
    with pytest.raises(ShardsError, match="shards of model/w do not join: I64 rows beside F32"):
        Shards(tmp_path, files)


def as_checkpoint(folder: Path, files: dict[str, str]) -> None:
    """The hand-written shards in ``folder`` made a whole checkpoint: the shared files, and an index of
    every file's true sha256 (as one re-hashed after tampering would be)."""
    (folder / "optimizer.json").write_text(
        json.dumps({"param_groups": [{"params": [0], "lr": 0.1, "betas": [0.9, 0.99]}]})
    )
    state = {"step": 2, "epoch": 0, "batch_in_epoch": 2, "tokens_seen": 0, "history": []}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    names = [*files, "optimizer.json", "trainer_state.json"]
    (folder / INDEX).write_text(index_text({n: sha256_file(folder / n) for n in names}, None))


def copy_over(folder: Path, source: str, target: str) -> None:
    (folder / target).write_bytes((folder / source).read_bytes())


def reshape_listing(folder: Path, name: str) -> None:
    listing = json.loads((folder / name).read_text())
    listing["tensors"]["model/w"]["shape"] = [7, 2]
    (folder / name).write_text(json.dumps(listing))


@pytest.mark.parametrize(
    ("tamper", "file", "said"),
    [
        (
            lambda f: copy_over(f, "model-0.safetensors", "model-1.safetensors"),
            "model-1.safetensors",
            "hold 8 of its 6",
        ),
        (lambda f: reshape_listing(f, "shards-1.json"), "shards-1.json", "model/w has two shapes across the shards"),
        (
            lambda f: [
                copy_over(f, f"{kind}-0.{ext}", f"{kind}-1.{ext}")
                for kind, ext in [("model", "safetensors"), ("shards", "json")]
            ],
            "shards-1.json",
            "shards-1.json says rank 0 of 2",
        ),
        (
            lambda f: (f / "optimizer-exp_avg-1.safetensors").unlink(),
            "optimizer-exp_avg-0.safetensors",
            "exp_avg/0 hold 4 of its 6",
        ),
    ],
    ids=["rows-of-another-process", "another-shape", "a-listing-of-another-rank", "a-moment-file-left-out"],
)
def test_a_checkpoint_whose_shards_do_not_join_fails_its_checks_naming_the_file_and_the_tensor(
    tmp_path, tamper, file, said
):
    files = write_by_hand(tmp_path, torch.ones(6, 2), [4])
    as_checkpoint(tmp_path, files)
    assert checkpoint_problem(tmp_path) is None  # as written, it joins
    tamper(tmp_path)
    kept = {n: d for n, d in files.items() if (tmp_path / n).exists()}
    as_checkpoint(tmp_path, kept)  # every sha256 true again: only the listings disagree with the files
    rejected = checkpoint_problem(tmp_path)
    assert rejected is not None and rejected.file == file and said in rejected.reason


# A checkpoint written by two processes and read by M: tensors whose rows do not divide evenly (7 rows on
# 3 or 4 processes; 3 and 2 rows on 4, so some processes hold none), AdamW's moments and its scalar step.
WHOLE = {"w": torch.arange(21.0).reshape(7, 3), "b": torch.arange(3.0) - 9, "e": torch.arange(10.0).reshape(2, 5)}


def in_group(rank: int, world: int, store: str) -> object:
    """This spawned process in a gloo group of ``world`` over the file ``store``, and its mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def write_as_process(rank: int, world: int, folder: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = in_group(rank, world, f"{folder}/store")
    params = {name: distribute_tensor(tensor, mesh, [Shard(0)]) for name, tensor in WHOLE.items()}
    moments = {str(i): distribute_tensor(tensor * 2, mesh, [Shard(0)]) for i, tensor in enumerate(WHOLE.values())}
    write_shards(Path(folder), rank, world, params, {"exp_avg": moments, "step": {"0": torch.tensor(5.0)}})
    dist.destroy_process_group()


def read_as_process(rank: int, world: int, folder: str, out: str) -> None:
    """This process's rows of each tensor, read as they are placed into a DTensor of the group's mesh,
    saved to ``out`` with the rows torch's own sharding gives this process."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = in_group(rank, world, f"{out}/store")
    files = {p.name: "" for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".json")}
    got = {}
    with Shards(Path(folder), files) as shards:
        for i, (name, tensor) in enumerate(WHOLE.items()):
            like = distribute_tensor(torch.zeros_like(tensor), mesh, [Shard(0)])
            for key, want in ((f"model/{name}", tensor), (f"exp_avg/{i}", tensor * 2)):
                placed = shards.placed(key, like)
                assert placed.shape == tensor.shape and placed.placements == like.placements
                got[key] = placed.to_local()
                got[f"torch/{key}"] = distribute_tensor(want, mesh, [Shard(0)]).to_local()
        got["step/0"] = shards.placed("step/0", None)
    save_file(got, f"{out}/rank-{rank}.safetensors")
    dist.destroy_process_group()


def spawned(function, world: int, *args) -> None:
    torch.multiprocessing.start_processes(function, (world, *map(str, args)), nprocs=world, start_method="spawn")


@pytest.fixture(scope="module")
def written_by_two(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("written-by-two")
    spawned(write_as_process, 2, folder)
    (folder / "store").unlink(missing_ok=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("readers", [1, 3, 4])
def test_two_processes_shards_read_by_m_give_each_process_its_own_rows(written_by_two, readers, tmp_path):
    spawned(read_as_process, readers, written_by_two, tmp_path)
    per_rank = [load_file(str(tmp_path / f"rank-{rank}.safetensors")) for rank in range(readers)]
    for i, (name, tensor) in enumerate(WHOLE.items()):
        for key, want in ((f"model/{name}", tensor), (f"exp_avg/{i}", tensor * 2)):
            assert all(torch.equal(got[key], got[f"torch/{key}"]) for got in per_rank), key  # torch's own cut
            assert torch.equal(torch.cat([got[key] for got in per_rank]), want), key  # every row once, in order
    assert [got["step/0"].item() for got in per_rank] == [5.0] * readers
