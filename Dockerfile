# syntax=docker/dockerfile:1
# One image for every SVP role (sampler, scorer, grounder, trainer, gateway, Celery worker): the
# role is the command, e.g. `svp serve sampler --host 0.0.0.0 --port 8001`. Images carry no
# weights: models come from a mounted volume (local paths) or a Hugging Face cache (HF_HOME).
#
#   docker build -t svp:cpu .                                  # CPU
#   docker build -t svp:gpu --build-arg SVP_EXTRAS=gpu .       # CUDA, with vLLM
#
# torch is pinned (pyproject.toml). Its Linux wheel on PyPI bundles the CUDA runtime, so the same
# wheel serves both images; a CPU-only image can take a smaller CPU wheel by passing
# --build-arg TORCH_INDEX_URL=<a PyTorch CPU wheel index>.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
# TOKENIZERS_PARALLELISM names a library switch, not a secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/hf \
    TOKENIZERS_PARALLELISM=false
# libgomp1: torch's OpenMP runtime. Debian's security updates move these versions, so they are
# not pinned (the base image tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin svp

FROM base AS builder
ARG SVP_EXTRAS=""
ARG TORCH_INDEX_URL=""
# build-essential: packages without a wheel for this platform compile here, never in the final stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY svp ./svp
COPY services ./services
COPY gateway ./gateway
# torch first and pinned, from TORCH_INDEX_URL when one is given; then the package, whose
# pyproject.toml pins what matters (torch, transformers, peft, celery).
# hadolint ignore=DL3013
RUN torch_pin="$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')" \
    && if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" "${torch_pin}"; \
       else pip install "${torch_pin}"; fi \
    && pip install ".${SVP_EXTRAS:+[${SVP_EXTRAS}]}"

FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
RUN mkdir -p /data /artifacts /models && chown svp:svp /data /artifacts /models
USER 10001
WORKDIR /home/svp
VOLUME ["/data", "/artifacts", "/models"]
EXPOSE 8000
# Each role's healthcheck names its own port (docker-compose.yml); this default fits the gateway.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD ["svp", "healthcheck", "http://127.0.0.1:8000/readyz"]
ENTRYPOINT []
CMD ["svp", "serve", "gateway", "--host", "0.0.0.0", "--port", "8000"]
