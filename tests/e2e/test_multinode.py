"""Two "nodes" on one machine: two launchers (``python -m job.launch``, accelerate's
``--num_machines 2 --machine_rank 0|1`` over gloo), each with its own scratch and cache folders, one
shared run in moto's S3, as two pods of the chart's Indexed Job run it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from job.core.errors import ExitCode
from job.launch import group_exit_code
from tests.helpers import REPO, cli, events, free_port


def _node_args(tiny_model_dir, shared_data, node_dir, run_id: str, *extra: str) -> list[str]:
    cache = node_dir / "cache"
    if not cache.exists():  # each node's cache holds the tokenizer, as a pre-seeded node's would
        shutil.copytree(shared_data / "gpt2", cache / "gpt2")
    return [
        "run",
        *("--model-dir", str(tiny_model_dir), "--data", str(shared_data / "instruction-data.json")),
        *("--cache", str(cache), "--scratch", str(node_dir / "scratch")),
        *("--output", "s3://multi/runs", "--run-id", run_id, "--skip-judge"),
        *("--max-steps", "12", "--eval-freq", "2", "--checkpoint-every", "4", "--lr", "1e-4"),
        *("--limit", "2", "--max-new-tokens", "4", "--metrics-port", "0", "--log-format", "json"),
        *extra,
    ]


def _start_nodes(tiny_model_dir, shared_data, tmp_path, run_id: str, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    nodes = []
    for rank in (0, 1):
        launch = ["--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"]
        launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "job.cli"]
        args = _node_args(tiny_model_dir, shared_data, tmp_path / run_id / f"node{rank}", run_id, *extra)
        nodes.append(
            subprocess.Popen(
                [sys.executable, "-m", "job.launch", *launch, *args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return nodes


def _finish(nodes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=600) for p in nodes]
    return [(p.returncode, out, err) for p, (out, err) in zip(nodes, outputs, strict=True)]


def _weights(s3, run_id: str) -> dict[str, torch.Tensor]:
    body = s3.get_object(Bucket="multi", Key=f"runs/{run_id}/model/model.safetensors")["Body"].read()
    return load(body)


def _keys(s3, run_id: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="multi", Prefix=f"runs/{run_id}/")
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_the_launcher_exits_with_the_code_that_speaks_for_the_group():
    assert group_exit_code(0, []) == 0
    assert group_exit_code(1, [75, 75]) == ExitCode.RETRY  # torchrun's agent says 1 whatever its workers said
    assert group_exit_code(1, [70, 75]) == ExitCode.RETRY  # a peer lost mid-collective, another preempted
    assert group_exit_code(1, [75, 2]) == ExitCode.BAD_CONFIG
    assert group_exit_code(1, []) == ExitCode.INTERNAL  # a worker killed before it could say anything
    assert group_exit_code(1, [], signalled=True) == ExitCode.RETRY


@pytest.mark.slow
def test_two_nodes_share_one_run_and_resume_it_from_s3_after_one_node_is_stopped(
    s3, tiny_model_dir, shared_data, tmp_path
):
    s3.create_bucket(Bucket="multi")
    started = time.monotonic()
    results = _finish(_start_nodes(tiny_model_dir, shared_data, tmp_path, "two"))
    two_nodes_s = time.monotonic() - started
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    (_, out0, _), (_, out1, _) = results
    log0, log1 = events(out0), events(out1)
    # global rank 0 alone wrote to the bucket; node 1 only trained
    assert all(e["rank"] == 1 for e in log1)
    assert not [e for e in log1 if e["event"] in ("checkpoint", "checkpoint_uploaded", "stage_done", "run_complete")]
    uploads = [e for e in log0 if e["event"] == "checkpoint_uploaded"]
    assert [e["checkpoint"] for e in uploads] == ["step-00000004", "step-00000008", "step-00000012"]
    assert not (tmp_path / "two" / "node1" / "scratch" / "two" / "model").exists()
    # node 1's generator states reached the bucket through the main process; node 1 kept no half-made folder
    assert {"rng-0.safetensors", "rng-0.json", "rng-1.safetensors", "rng-1.json"} <= {
        k.rsplit("/", 1)[1] for k in _keys(s3, "two") if "/step-00000012/" in k
    }
    assert not list((tmp_path / "two" / "node1").rglob(".step-*"))
    manifest = json.loads(s3.get_object(Bucket="multi", Key="runs/two/manifest.json")["Body"].read())
    assert [manifest["stages"][s]["status"] for s in ("download", "finetune", "generate")] == ["complete"] * 3
    uploaded = sum(meta["size"] for s in manifest["stages"].values() for meta in s.get("artifacts", {}).values())

    # the same command again on both nodes: the main process finds every stage done and says so to the
    # others, so no process trains alone and waits for the rest (it used to hang in the outputs' barrier)
    again = _finish(_start_nodes(tiny_model_dir, shared_data, tmp_path, "two"))
    assert [code for code, _, _ in again] == [0, 0], [e[-2000:] for _, _, e in again]
    skipped = [e["stage"] for e in events(again[0][1]) if e["event"] == "stage_skipped"]
    assert skipped == ["download", "finetune", "generate"]
    assert not [e for _, out, _ in again for e in events(out) if e["event"] in ("eval", "finetune_start")]

    # the same global batch on one node and one process
    one_args = _node_args(tiny_model_dir, shared_data, tmp_path / "one", "one")
    single = cli(*one_args)
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = _weights(s3, "two"), _weights(s3, "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-6

    # SIGTERM to node 1 mid-epoch: both groups checkpoint and exit 75; both rerun with empty folders
    nodes = _start_nodes(tiny_model_dir, shared_data, tmp_path, "cut")
    deadline = time.monotonic() + 300
    for line in nodes[0].stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "checkpoint_uploaded" or time.monotonic() > deadline:
            break
    nodes[1].send_signal(signal.SIGTERM)
    stopped = _finish(nodes)
    assert [code for code, _, _ in stopped] == [ExitCode.RETRY, ExitCode.RETRY], [e[-2000:] for _, _, e in stopped]
    assert not (tmp_path / "cut" / "node0" / "scratch" / "cut" / "model").exists()
    shutil.rmtree(tmp_path / "cut")
    assert any(k.endswith("/index.json") for k in _keys(s3, "cut"))
    resumed = _finish(_start_nodes(tiny_model_dir, shared_data, tmp_path, "cut"))
    for code, _out, err in resumed:
        assert code == 0, err[-3000:]
    for _, out, _ in resumed:  # each node fetched the checkpoint into its own empty scratch
        assert any(e["event"] == "checkpoint_downloaded" for e in events(out))
    assert [e["event"] for e in events(resumed[0][1]) if e["event"] == "resumed"] == ["resumed"]
    # each process took back its own generator states, node 1's too
    assert not [e for _, out, _ in resumed for e in events(out) if e["event"] == "checkpoint_rng_missing"]
    cut = _weights(s3, "cut")
    assert cut.keys() == two.keys() and all(torch.equal(cut[k], two[k]) for k in two)
    print(f"two nodes: {two_nodes_s:.1f} s, rank 0 uploaded {uploaded / 2**20:.1f} MiB of artifacts, rank 1 none")


@pytest.mark.slow
def test_the_slurm_scripts_launch_line_on_two_nodes_runs_one_job_into_s3(s3, tiny_model_dir, shared_data, tmp_path):
    """slurm/finetune.sbatch as Slurm runs it on a two-node allocation: its srun step started once per
    node with SLURM_NODEID (this Slurm runs one slurmd per host, so srun is a stand-in that starts the
    step's command twice), each node with its own scratch and cache."""
    import os

    s3.create_bucket(Bucket="slurm-two")
    nodes = tmp_path / "nodes"
    for node in (0, 1):
        shutil.copytree(shared_data / "gpt2", nodes / f"node{node}" / "cache" / "gpt2")
    config = {
        "model_dir": str(tiny_model_dir),
        "data": str(shared_data / "instruction-data.json"),
        "output": "s3://slurm-two/runs",
        "max_steps": 8,
        "eval_freq": 4,
        "checkpoint_every": 4,
        "limit": 2,
        "max_new_tokens": 4,
        "metrics_port": 0,
        "log_format": "json",
        "skip_judge": True,
    }
    (tmp_path / "job.yaml").write_text(json.dumps(config))
    stand_ins = REPO / "tests" / "slurm" / "two-nodes"
    env = {
        **os.environ,
        "PATH": f"{stand_ins}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TWO_NODES": str(nodes),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SFT_JOB_MAIN_PORT": str(free_port()),
        "SFT_JOB_SKIP_JUDGE": "true",
    }
    done = subprocess.run(
        ["bash", "slurm/finetune.sbatch", str(tmp_path / "job.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    node0, node1 = ((nodes / f"node{n}.out").read_text() for n in (0, 1))
    assert done.returncode == 0, done.stderr + node0[-2000:] + node1[-2000:]
    manifest = json.loads(s3.get_object(Bucket="slurm-two", Key="runs/slurm-4242/manifest.json")["Body"].read())
    assert [manifest["stages"][s]["status"] for s in ("download", "finetune", "generate")] == ["complete"] * 3
    log0, log1 = events(node0), events(node1)
    assert [e["checkpoint"] for e in log0 if e["event"] == "checkpoint_uploaded"] == ["step-00000004", "step-00000008"]
    assert all(e["rank"] == 1 for e in log1) and not [e for e in log1 if e["event"] == "checkpoint_uploaded"]
    assert any(e["event"] == "finetune_start" and e["processes"] == 2 for e in log0)


def test_torchrun_through_the_launcher_takes_its_rendezvous_from_kubeflow_trainers_variables(
    tiny_model_dir, cache, tmp_path
):
    """The TrainJob's command (job.launch --torchrun) with the PET_* variables Trainer's torch runtime sets."""
    import os

    pet = {"PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "2"}
    pet |= {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    args = ["finetune", "--model-dir", tiny_model_dir, "--data", cache / "instruction-data.json"]
    args += ["--cache", cache, "--output", tmp_path / "ft", "--max-steps", "2", "--log-format", "json"]
    done = subprocess.run(
        [sys.executable, "-m", "job.launch", "--torchrun", "--module", "job.cli", *map(str, args)],
        cwd=REPO,
        env={**os.environ, **pet},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [start] = [e for e in events(done.stdout) if e["event"] == "finetune_start"]
    assert start["processes"] == 2 and (tmp_path / "ft" / "model" / "model.safetensors").is_file()
