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


@pytest.mark.slow
def test_sharding_benchmark_counts_half_of_every_shard_on_two_processes(tmp_path):
    """``python -m benchmarks sharding --quick``'s memory cases: tiny shapes of both families, whose every
    dimension 0 is even, so two processes hold exactly half of one process's weights and gradients."""
    out = tmp_path / "sharding.json"
    cmd = [sys.executable, "-m", "benchmarks", "sharding", "--quick", "--only", "memory", "--wait", "0"]
    proc = subprocess.run(cmd + ["--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["model"], r["processes"]): r for r in json.loads(out.read_text())["memory_table"]}
    assert sorted(rows) == [("gpt2-medium", 1), ("gpt2-medium", 2), ("qwen3-0.6b", 1), ("qwen3-0.6b", 2)]
    for model in ("gpt2-medium", "qwen3-0.6b"):
        one, two = rows[(model, 1)], rows[(model, 2)]
        assert one["weight_bytes"] == 4 * one["parameters"]  # fp32, a tied head counted once
        assert one["gradient_bytes"] == one["weight_bytes"]
        assert two["weight_bytes"] * 2 == one["weight_bytes"] and two["gradient_bytes"] * 2 == one["gradient_bytes"]
        # AdamW's two moments a parameter, and each tensor's step counter (4 bytes, on every process)
        assert 0 < two["optimizer_bytes"] - one["optimizer_bytes"] / 2 < 4 * 64
        # a few MB of weights may stay under the imports' own high-water mark: the peak never goes back
        assert two["rss_peak"] >= two["rss_peak_built"] >= two["rss_peak_imported"] > 0


def test_a_sharding_case_that_cannot_fit_is_reported_and_not_started():
    from benchmarks.sharding import Case, run_case

    result = run_case(Case("qwen3-0.6b", 4, "ddp"), headroom=1e6, wait=0)
    assert result["not_run"].startswith("did not fit: needs about ")
    assert "processes" not in result and result["parameters"] == 596_049_920  # Qwen3-0.6B, the head tied


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--steps", "0"], "argument --steps: '0' is not 1 or more"),
        (["--steps", "-1"], "argument --steps: '-1' is not 1 or more"),
        (["--headroom", "-1"], "argument --headroom: '-1' is not a finite number of 0 or more"),
        (["--headroom", "nan"], "argument --headroom: 'nan' is not a finite number of 0 or more"),
        (["--wait", "-5"], "argument --wait: '-5' is not a finite number of 0 or more"),
        (["--out", "{tmp}/missing/b.json"], "argument --out: folder {tmp}/missing does not exist"),
        (["--out", "{tmp}"], "argument --out: {tmp} is a folder; name the JSON file to write"),
        (["--out", "{tmp}/file/b.json"], "argument --out: folder {tmp}/file does not exist"),
    ],
    ids=[
        "steps-0",
        "steps-negative",
        "headroom-negative",
        "headroom-nan",
        "wait-negative",
        "out-missing-folder",
        "out-a-folder",
        "out-under-a-file",
    ],
)
def test_a_sharding_benchmark_flag_it_cannot_use_is_exit_2_naming_it_before_any_measurement(
    args, said, tmp_path, monkeypatch, capsys
):
    from benchmarks import sharding

    def measured(*_args):
        raise AssertionError("a measurement started")

    monkeypatch.setattr(sharding, "run_case", measured)
    (tmp_path / "file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exited:
        sharding.main(["--quick", *(a.format(tmp=tmp_path) for a in args)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(said.format(tmp=tmp_path))
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_the_sharding_benchmark_s_out_file_is_probed_not_clobbered_before_its_first_figure(tmp_path, monkeypatch):
    from benchmarks import sharding

    kept = tmp_path / "b.json"
    kept.write_text('{"earlier": "figures"}')
    seen = []

    def measured(*_args):  # the file as the first measurement finds it
        seen.append(kept.read_text())
        raise KeyboardInterrupt

    monkeypatch.setattr(sharding, "run_case", measured)
    with pytest.raises(KeyboardInterrupt):
        sharding.main(["--quick", "--only", "speed", "--out", str(kept)])
    assert seen == ['{"earlier": "figures"}']
    with pytest.raises(KeyboardInterrupt):
        sharding.main(["--quick", "--only", "speed", "--out", str(tmp_path / "new.json")])
    assert not (tmp_path / "new.json").exists()  # the probe left no empty file behind


@pytest.mark.parametrize(
    "command",
    [
        ["benchmarks", "cpu", "--quick"],
        ["benchmarks", "packing", "--quick"],
        ["benchmarks.data_formats"],
        ["benchmarks.data_sources"],
        ["benchmarks.smoke", "--runs", "1"],
    ],
    ids=["cpu", "packing", "data_formats", "data_sources", "smoke"],
)
def test_every_benchmark_refuses_an_out_it_could_not_write_before_measuring(command, tmp_path):
    """Each benchmark's ``--out`` into a missing folder: exit 2 naming it at once (it used to be a traceback
    after every measurement, the figures lost)."""
    out = tmp_path / "missing" / "b.json"
    done = subprocess.run(
        [sys.executable, "-m", *command, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].endswith(f"argument --out: folder {out.parent} does not exist")
    assert list(tmp_path.iterdir()) == []
