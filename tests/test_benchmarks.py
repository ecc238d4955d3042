"""The benchmark harness itself, on CPU at tiny shapes (the figures come from `python -m benchmarks`)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_mode_runs_on_cpu_at_tiny_shapes_and_writes_every_selected_figure(shared_data, tmp_path):
    out = tmp_path / "results.json"
    keys = ["train/ours", "generate/ours", "generate/hf", "recipe/ours", "recipe/ours/levers", "generate/ours/levers"]
    keys += ["qwen3_train/ours", "qwen3_generate/ours", "qwen3_generate/hf"]  # qwen3-0.6b's shape, 2 layers
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "gpu",
        "--quick",
        "--device",
        "cpu",
        "--data-dir",
        str(shared_data),
        "--out",
        str(out),
    ] + [a for k in keys for a in ("--select", k)]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ | {"BENCH_THREADS": "2"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == keys
    assert not [k for k, v in results.items() if "error" in v], results
    assert results["train/ours"]["tokens_per_second"] > 0
    assert (
        results["generate/ours"]["new_tokens"] == results["generate/hf"]["new_tokens"] == 110 * 4
    )  # all forced to full length
    recipe = results["recipe/ours"]
    # 60 entries: 51 to train on, 6 steps x 2 epochs, evaluated at steps 0, 5 and 10
    assert recipe["evaluations"] == 3 and recipe["last_val_loss"] < recipe["first_val_loss"] - 1
    assert report["targets"]["generate/ours:wall_seconds"]["measured"] == results["generate/ours"]["wall_seconds"]
    levers = results["recipe/ours/levers"]  # padded batches and one-forward evaluations: the same curve
    assert levers["levers"] and levers["tokens_seen"] == recipe["tokens_seen"]
    # bf16 autocast on other shapes: measured 8e-4 here (fp32: within 1e-5, tests/stages/test_finetune.py)
    assert abs(levers["last_val_loss"] - recipe["last_val_loss"]) < 2e-3
    assert results["generate/ours/levers"]["new_tokens"] == 110 * 4
    assert results["qwen3_train/ours"]["tokens_per_second"] > 0
    assert results["qwen3_generate/ours"]["new_tokens"] == results["qwen3_generate/hf"]["new_tokens"] == 110 * 4
    assert report["ratios"]["qwen3_generate_vs_hf"] > 0


def test_unknown_measurement_is_a_one_line_error(shared_data):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "gpu",
            "--device",
            "cpu",
            "--data-dir",
            str(shared_data),
            "--select",
            "train/nobody",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1  # sys.exit with a message
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("--select: unknown measurement 'train/nobody'; one of generate/ours")


def test_a_killed_benchmark_leaves_no_measurement_running(shared_data, tmp_path):
    """A timeout kills the benchmark with SIGKILL: the process measuring for it must end too."""
    import psutil

    from tests.helpers import wait_until

    cmd = [sys.executable, "-m", "benchmarks", "gpu", "--quick", "--device", "cpu", "--data-dir", str(shared_data)]
    bench = subprocess.Popen(
        [*cmd, "--select", "recipe/ours", "--out", str(tmp_path / "r.json")], cwd=REPO, stderr=subprocess.DEVNULL
    )
    try:
        parent = psutil.Process(bench.pid)
        measuring = wait_until(lambda: parent.children(recursive=True), 120, 0.1, what="the measuring process")
    finally:
        bench.kill()
        bench.wait()
    # The measurement alone runs ~20 s more on 2 cores: an orphan would still be there after 5
    gone, alive = psutil.wait_procs(measuring, timeout=5)
    assert alive == [], [p.cmdline() for p in alive]
    assert not (tmp_path / "r.json").exists()


def test_the_smoke_benchmark_accounts_for_the_smokes_time_and_bytes(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.smoke", "--runs", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    [run] = report["runs"]
    assert set(run["stage_seconds"]) == {"download", "finetune", "generate"}
    parts = run["startup_seconds"] + run["preflight_seconds"] + sum(run["stage_seconds"].values()) + run["exit_seconds"]
    assert 0 < parts <= run["wall_seconds"] + 0.1 and run["wall_seconds"] == report["smoke_wall_seconds_median"]
    assert run["run_bytes"] == sum(run["run_bytes_by_entry"].values())
    assert {"checkpoints", "model", "smoke-model", "report.html"} <= set(run["run_bytes_by_entry"])
    assert report["ratio_smoke_vs_help"] == round(
        report["smoke_wall_seconds_median"] / report["help_seconds_median"], 1
    )
