# The NME service image: API (`nme-service serve`), migrations and the worker (`nme-service worker`).
#
# CPU by default. For NVIDIA GPUs, build on a CUDA runtime base and take torch's CUDA wheels:
#   docker build -t nme-service:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# and run it with `--gpus all` (NME_DEVICE=auto then picks CUDA).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python:* images have Python; CUDA bases do not (Ubuntu 24.04 ships 3.12, which we support).
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# torch first, from the chosen index, so the next step never pulls a different build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY nme ./nme
COPY service ./service
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install . && python -c "import service.app, nme"

RUN useradd --create-home --uid 10001 nme \
    && mkdir -p /data/artifacts \
    && chown -R nme:nme /data
USER nme

ENV NME_ENVIRONMENT=production \
    NME_ARTIFACT_DIR=/data/artifacts \
    NME_HOST=0.0.0.0 \
    NME_PORT=8000
EXPOSE 8000
VOLUME ["/data/artifacts"]

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]

CMD ["nme-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
