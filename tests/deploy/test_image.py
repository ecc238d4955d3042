"""The project's own Dockerfile, built and run for real with podman: no registry, no Docker engine.

The base stands in for `python:3.11-slim-bookworm` (which cannot be pulled here): Debian bookworm's own
packages (its python3 is 3.11) put together by mmdebstrap and imported, cached by tag between runs. The
Dockerfile is built unchanged, with only that base passed by `--from`; the build reaches the package
index the way this machine's pip does (its configuration, the folders it names, the CA bundle, mounted
for the build's RUN steps only). What this VM needs of podman (runc, cgroupfs, no ulimits) is in this
test's own containers.conf, not in the project's files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

BASE = "localhost/sft-job-base:bookworm-py311"
IMAGE = "localhost/sft-job:test"
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def _podman(env: dict, *args, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(map(str, args[:3]))}: {done.stderr[-3000:]}"
    return done


def _make_base(env: dict, folder: Path) -> None:
    """Debian's minimal system with python3, pip and venv; no EXTERNALLY-MANAGED marker, as the python
    image has none (pip installs into the system Python there)."""
    tar = folder / "base.tar"
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,ca-certificates,passwd",
            '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
            "bookworm",
            str(tar),
            "http://deb.debian.org/debian",
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    _podman(env, "import", tar, BASE)
    tar.unlink()


def _pip_settings(folder: Path) -> tuple[Path, list[Path]]:
    """This machine's pip configuration as one pip.conf (files and PIP_* variables alike), and the local
    paths it names (find-links folders, file:// indexes, the CA bundle), for the build to mount."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings, paths = {}, []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name, value = key.rsplit(".", 1)[-1], value.strip().strip("'")
        if name == "constraint":
            continue  # this machine's caps on its own disk; the build installs from the lock's pins
        settings[name] = value
        for token in value.split():
            path = Path(token.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                paths.append(path.parent if path.name == "simple" else path)
    conf = folder / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return conf, sorted(set(paths))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("image")
    (folder / "containers.conf").write_text(CONTAINERS_CONF)
    env = os.environ | {"CONTAINERS_CONF": str(folder / "containers.conf")}
    began = time.monotonic()
    if _podman(env, "image", "exists", BASE, check=False).returncode != 0:
        _make_base(env, folder)
    based = time.monotonic()
    conf, paths = _pip_settings(folder)
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"] + [a for p in paths for a in ("-v", f"{p}:{p}:ro")]
    build = ["build", "--from", BASE, "--pull=never", "--network=host", *mounts, "-t", IMAGE, REPO]
    _podman(env, *build)
    print(f"base {based - began:.0f} s, build {time.monotonic() - based:.0f} s")
    yield env
    # The image is about 3 GB and the rest of the suite needs the disk; the base (250 MB) stays, by tag.
    _podman(env, "rmi", IMAGE)
    _podman(env, "image", "prune", "--force")


def test_the_image_runs_as_uid_1000_with_home_on_tmp_and_the_locks_torch(image):
    who = _podman(image, "run", "--rm", "--network=none", "--entrypoint", "sh", IMAGE, "-c", 'id -u; echo "$HOME"')
    assert who.stdout.split() == ["1000", "/tmp"]
    locked = next(
        line.split("==")[1].split()[0]
        for line in (REPO / "requirements" / "lock.txt").read_text().splitlines()
        if line.startswith("torch==")
    )
    probe = "import torch; print(torch.__version__)"
    torch_version = _podman(image, "run", "--rm", "--network=none", "--entrypoint", "python3", IMAGE, "-c", probe)
    assert torch_version.stdout.strip().split("+")[0] == locked
    helped = _podman(image, "run", "--rm", "--network=none", "--read-only", IMAGE, "--help")
    assert helped.stdout.startswith("Usage: sft-job [OPTIONS] COMMAND [ARGS]...")


def test_the_smoke_runs_in_the_image_read_only_with_no_network_from_an_empty_cache(image, tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    for folder in (runs, cache):
        folder.mkdir()
        os.chown(folder, 1000, 1000)  # the image's user writes there
    volumes = ["-v", f"{runs}:/runs", "-v", f"{cache}:/cache"]
    container = ["run", "--rm", "--network=none", "--read-only", "--tmpfs", "/tmp", *volumes, IMAGE]
    smoke = _podman(image, *container, "run", "--smoke", "--skip-judge", "--run-id", "img", "--log-format", "json")
    run = runs / "img"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete", smoke.stderr[-3000:]
    assert {s["status"] for s in manifest["stages"].values()} == {"complete"}
    assert (run / "report.html").is_file() and (run / "model" / "model.safetensors").is_file()
    assert [p.name for p in cache.iterdir()] == ["smoke"]  # the smoke's own data; nothing downloaded
    assert (run / "config.yaml").stat().st_uid == 1000
