"""fsdp's checkpoint shards joined back: every process's rows, each exactly once, into the whole tensors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from job.training.checkpoint_shards import ShardsError, read_shards


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
    [([0, 2, 2], "do not join"), ([0, 3, 5], "do not join"), ([1, 3, 5], "do not join")],
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
