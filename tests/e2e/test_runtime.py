"""One supported runtime: the lock, the image, CI and the README agree, and the image's install steps run."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.helpers import REPO, cli, events

LOCK = REPO / "requirements" / "lock.txt"
BOOK = REPO / "requirements" / "book.txt"  # the book's code, installed without dependencies for the tests
LOCK_LINE = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)\s*(?:;\s*(.+))?$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, list[tuple[str, str | None]]]:
    """Each locked distribution's (version, marker) entries."""
    locked: dict[str, list[tuple[str, str | None]]] = {}
    for line in (LOCK.read_text() + BOOK.read_text()).splitlines():
        match = LOCK_LINE.match(re.sub(r"\s+--hash=\S+", "", line))
        if match:
            locked.setdefault(_name(match[1]), []).append((match[2], match[3]))
    return locked


def _locked_version(name: str) -> str | None:
    """The version the lock installs on this machine (its marker evaluated here)."""
    for version, marker in _lock().get(_name(name), []):
        if marker is None or Marker(marker).evaluate():
            return version
    return None


def _lock_python() -> str:
    return re.search(r"--python-version (\d+\.\d+)", LOCK.read_text())[1]


def dockerfile_instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            instructions.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def _readme_commands() -> list[str]:
    """The set-up section's commands: run the job, and install and run the tests."""
    setup = (REPO / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)


def test_torch_and_python_versions_agree_across_lock_image_ci_readme_and_this_environment():
    torch_version, python = _locked_version("torch"), _lock_python()
    assert torch_version, "requirements/lock.txt pins no torch"
    # The image: a Python base of the lock's minor version, every package through the install script.
    instructions = dockerfile_instructions()
    [base] = [args for word, args in instructions if word == "FROM"]
    match = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base)
    assert match and match[1] == python, f"Dockerfile FROM {base}: the lock is for Python {python}"
    runs = [args for word, args in instructions if word == "RUN"]
    assert any("scripts/install.sh" in r for r in runs)
    assert not [r for r in runs if re.search(r"\bpip\b|\buv\b|conda", r)], "install through scripts/install.sh only"
    copied = " ".join(args for word, args in instructions if word == "COPY")
    assert "requirements/lock.txt" in copied and "scripts/install.sh" in copied
    # CI runs the README's test command word for word; both README commands install from the lock.
    readme = _readme_commands()
    assert len(readme) == 2 and all("bash scripts/install.sh" in c for c in readme), readme
    assert readme[1] in (REPO / ".ci" / "run").read_text()
    assert "ruff check" in readme[1] and "ruff format --check" in readme[1]
    # No other torch version named anywhere a user or CI reads one.
    for path in ("Dockerfile", ".ci/run", "README.md", "scripts/install.sh"):
        text = (REPO / path).read_text()
        named = re.findall(r"torch==([\w.+]+)|pytorch/pytorch:([\d.]+)", text)
        assert all(v in (torch_version, "") for pair in named for v in pair), f"{path} names torch {named}"
    # pyproject's ranges admit every locked version, and this environment is the locked one.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = Requirement(text)
        locked = _locked_version(req.name)
        if locked is not None and (req.marker is None or req.marker.evaluate()):
            assert req.specifier.contains(locked, prereleases=True), f"pyproject {text} excludes the lock's {locked}"
    assert Version(torch.__version__).base_version == torch_version
    assert SpecifierSet(project["requires-python"]).contains(python + ".0")
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == python


def test_every_installed_distribution_that_the_lock_names_is_at_the_locked_version():
    checked, wrong = 0, []
    # The environment's own site-packages only: setuptools puts its vendored copies on sys.path.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in importlib.metadata.distributions(path=site):
        locked = _locked_version(dist.metadata["Name"])
        if locked is None:
            continue
        checked += 1
        if Version(dist.version).public != Version(locked).public and Version(dist.version).base_version != locked:
            wrong.append(f"{dist.metadata['Name']} {dist.version} (lock: {locked})")
    assert checked > 50 and wrong == []


def _smoke_args(shared_data: Path) -> list[str]:
    data = str(shared_data / "instruction-data.json")
    flags = ["--run-id", "smoke", "--metrics-port", "0", "--log-format", "json"]
    return ["run", "--smoke", "--skip-judge", "--data", data, *flags]


def assert_smoke_crossed_every_boundary(stdout: str, run_dir: Path) -> None:
    """Both epoch ends happened, each with its sample and its checkpoint, and the run finished."""
    log = events(stdout)
    kinds = [e["event"] for e in log]
    assert kinds[-1] == "run_complete"
    samples = [e for e in log if e["event"] == "sample"]
    assert [s["epoch"] for s in samples] == [1, 2] and all(isinstance(s["response"], str) for s in samples)
    checkpoints = [e["step"] for e in log if e["event"] == "checkpoint"]
    assert checkpoints == [5, 10], checkpoints  # 40 entries / batch 8 = 5 steps an epoch
    # Each epoch-end checkpoint comes right after that epoch's sample.
    assert kinds.index("checkpoint") == kinds.index("sample") + 1
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["train_limit"], config["epochs"], config["limit"], config["max_new_tokens"]) == (40, 2, 8, 16)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "loss-plot.png").is_file()
    responses = json.loads((run_dir / "instruction-data-with-response.json").read_text())
    assert len(responses) == 8 and all(r["model_response"] for r in responses)  # sampled: text for the judge


def test_smoke_run_crosses_an_epoch_end_its_checkpoint_and_sample(cache, tmp_path):
    done = cli(*_smoke_args(cache), "--output", tmp_path / "runs", "--cache", cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_smoke_crossed_every_boundary(done.stdout, tmp_path / "runs" / "smoke")


@pytest.mark.slow
def test_the_images_install_steps_in_a_fresh_venv_run_the_smoke(shared_data, tmp_path):
    """The Dockerfile's COPY and install RUN lines, word for word, in a venv instead of the image.

    Not replayed: the base image (this Python stands in; the version test checks its minor
    version), the user and volume lines, and pip's ENV settings (they only keep the image small)."""
    venv, workdir = tmp_path / "venv", tmp_path / "opt-sft-job"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    workdir.mkdir()
    replayed = 0
    for word, args in dockerfile_instructions():
        if word == "COPY":
            *sources, dest = args.split()
            for source in sources:
                target = workdir / dest / Path(source).name if dest.endswith("/") else workdir / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                copy = shutil.copytree if (REPO / source).is_dir() else shutil.copyfile
                copy(REPO / source, target)
        elif word == "RUN" and "scripts/install.sh" in args:
            done = subprocess.run(["bash", "-c", args], cwd=workdir, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"RUN {args}:\n{done.stderr[-3000:]}"
            replayed += 1
    assert replayed == 2
    cache = tmp_path / "cache"
    shutil.copytree(shared_data / "gpt2", cache / "gpt2")
    # The image's own settings: the cache and output folders come from SFT_JOB_* variables.
    env |= {"SFT_JOB_CACHE": str(cache), "SFT_JOB_OUTPUT": str(tmp_path / "runs"), "MPLCONFIGDIR": str(tmp_path)}
    sft_job = venv / "bin" / "sft-job"
    done = subprocess.run([sft_job, *_smoke_args(shared_data)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_smoke_crossed_every_boundary(done.stdout, tmp_path / "runs" / "smoke")
    python = venv / "bin" / "python"
    version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    assert Version(version.stdout.strip()).base_version == _locked_version("torch")


def test_the_smoke_preset_fills_in_only_the_options_left_at_their_defaults():
    from job.config import RunConfig

    preset = RunConfig(smoke=True)
    assert (preset.train_limit, preset.epochs, preset.limit, preset.max_new_tokens) == (40, 2, 8, 16)
    by_hand = RunConfig(smoke=True, train_limit=800, max_new_tokens=4)
    assert (by_hand.train_limit, by_hand.epochs, by_hand.max_new_tokens) == (800, 2, 4)
    assert RunConfig().train_limit is None and RunConfig().max_new_tokens == 256
