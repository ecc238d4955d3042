"""``sft-job run --export gguf``: the last model trained as GGUF with its Modelfile under {run_id}/export/, in
the manifest (sha256 of each file), the report and the bucket; a rerun adds it to a finished run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import cli, events, smoke_run


def gguf_tensor(path, name: str) -> np.ndarray:
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    return np.asarray(tensor.data).reshape([int(n) for n in reversed(tensor.shape)])


@pytest.mark.slow
def test_rerun_with_export_writes_the_dpo_model_as_gguf(cache, tmp_path):
    first = cli(*smoke_run(cache, tmp_path / "runs", "r1", "--dpo", "--skip-judge"))
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "r1"
    assert not (run / "export").exists()

    args = smoke_run(cache, tmp_path / "runs", "r1", "--dpo", "--skip-judge", "--export", "gguf")
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    ran = [e["stage"] for e in events(again.stdout) if e["event"] == "stage_start"]
    assert ran == ["export"]
    manifest = json.loads((run / "manifest.json").read_text())
    artifacts = manifest["stages"]["export"]["artifacts"]
    assert set(artifacts) == {"export/model.gguf", "export/Modelfile"}
    for key, meta in artifacts.items():
        body = (run / key).read_bytes()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (meta["size"], meta["sha256"]), key
    assert "export/model.gguf" in (run / "report.html").read_text()
    # the DPO model's weights (f16, the default), not the finetuned one's (they differ after DPO's steps)
    dpo, sft = load_file(run / "dpo" / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    exported = gguf_tensor(run / "export" / "model.gguf", "token_embd.weight")
    assert np.array_equal(exported, dpo["transformer.wte.weight"].astype(np.float16))
    assert not np.array_equal(exported, sft["transformer.wte.weight"].astype(np.float16))
    assert "### Response:" in (run / "export" / "Modelfile").read_text()

    third = cli(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "export" in [e["stage"] for e in events(third.stdout) if e["event"] == "stage_skipped"]


@pytest.mark.slow
def test_export_is_uploaded_to_the_bucket(s3, cache, tmp_path):
    s3.create_bucket(Bucket="runs")
    scratch = tmp_path / "scratch"
    args = smoke_run(cache, "s3://runs/team", "r2", "--skip-judge", "--export", "gguf", "--scratch", scratch)
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(s3.get_object(Bucket="runs", Key="team/r2/manifest.json")["Body"].read())
    for key, meta in manifest["stages"]["export"]["artifacts"].items():
        body = s3.get_object(Bucket="runs", Key=f"team/r2/{key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"], key
    assert set(manifest["stages"]["export"]["artifacts"]) == {"export/model.gguf", "export/Modelfile"}
