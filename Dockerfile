# sft-job: instruction-finetune GPT-2 on a GPU node. Build: docker build -t sft-job .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SFT_JOB_CACHE=/cache \
    SFT_JOB_OUTPUT=/runs \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/sft-job

# Dependencies first, from the project metadata alone, so a code change does not reinstall them.
# torch comes with the base image; the package's range admits it, so pip keeps it.
COPY pyproject.toml README.md ./
# DL3013: this installs the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN mkdir job && echo '__version__ = "0.0.0"' > job/__init__.py \
    && pip install '.[tf]' \
    && pip uninstall -y sft-job

COPY job ./job
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 sft \
    && mkdir -p /cache /runs \
    && chown sft:sft /cache /runs

USER 1000:1000
VOLUME ["/cache", "/runs"]
EXPOSE 9100
ENTRYPOINT ["sft-job"]
CMD ["run"]
