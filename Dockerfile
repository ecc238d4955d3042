# sft-job: instruction-finetune GPT-2 on a GPU node. Build: docker build -t sft-job:0.1.0 .
# Every Python package comes from requirements/lock.txt through scripts/install.sh, the script CI
# and the README use too, so the image runs the versions CI tests. torch is PyPI's CUDA 13 build
# (its CUDA libraries come as wheels), so the base is plain Python; GPU nodes need an NVIDIA
# driver >= 580. The Python minor version must match the lock's (the script checks).
FROM python:3.11.13-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SFT_JOB_CACHE=/cache \
    SFT_JOB_OUTPUT=/runs \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/sft-job

# Dependencies first, from the lock and the project metadata alone, so a code change does not
# reinstall them. tests/e2e/test_runtime.py runs these RUN lines in a venv, word for word, and
# tests/deploy/test_image.py builds and runs this file with podman.
COPY requirements/lock.txt requirements/lock.txt
COPY scripts/install.sh scripts/install.sh
COPY pyproject.toml README.md LICENSE ./
RUN bash scripts/install.sh --deps-only tf

COPY job ./job
RUN bash scripts/install.sh --project-only tf

RUN useradd --create-home --uid 1000 sft \
    && mkdir -p /cache /runs \
    && chown sft:sft /cache /runs

# Non-root, and the root filesystem may be read-only: what the job writes goes to /cache, /runs and
# /tmp (HOME too), e.g. docker run --read-only --tmpfs /tmp -v cache:/cache sft-job run --smoke.
USER 1000:1000
VOLUME ["/cache", "/runs"]
EXPOSE 9100
ENTRYPOINT ["sft-job"]
CMD ["run"]
