# syntax=docker/dockerfile:1
# UniGuard service images.
#   CPU (default, last stage):  docker build -t uniguard:cpu .
#   CUDA:                       docker build --target cuda -t uniguard:cuda .
# Both run `uniguard serve` with every setting from UNIGUARD_* environment variables (see docs/DEPLOYMENT.md).
# Final stages hold only a Python runtime, the serving dependencies (no torch, no compilers), the model and policies.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# Exported model folder baked into the image (relative to the build context).
ARG MODEL_DIR=models/uniguard-minilm
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# ---------------------------------------------------------------------------------------------------------------------
# builder: the package and its serving dependencies in a self-contained venv (wheels only, nothing compiled).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY uniguard ./uniguard
COPY policies ./policies
COPY service ./service
COPY export ./export
COPY training ./training
COPY merging ./merging
# Serving dependencies only: the [train] extra (torch, transformers) is never installed here; the check below fails
# the build if anything pulls torch in. The slim base has no compiler, so every dependency must come as a wheel.
RUN pip install --no-cache-dir --no-compile . \
    && pip uninstall -y pip setuptools wheel \
    && python -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('torch') else 0)"

# ---------------------------------------------------------------------------------------------------------------------
# cuda-builder: same venv on the CUDA base's own Python, with onnxruntime-gpu replacing onnxruntime.
FROM ${CUDA_IMAGE} AS cuda-builder
ARG ONNXRUNTIME_GPU_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY uniguard ./uniguard
COPY policies ./policies
COPY service ./service
COPY export ./export
COPY training ./training
COPY merging ./merging
RUN pip install --no-cache-dir --no-compile . \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir --no-compile "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && pip uninstall -y pip setuptools wheel \
    && python -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('torch') else 0)"

# ---------------------------------------------------------------------------------------------------------------------
# cuda: CUDA + cuDNN runtime base, onnxruntime-gpu, UNIGUARD_PROVIDER=cuda. Needs the NVIDIA container runtime.
FROM ${CUDA_IMAGE} AS cuda
ARG MODEL_DIR
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 uniguard \
    && useradd --system --uid 10001 --gid uniguard --home-dir /app --shell /usr/sbin/nologin uniguard
COPY --from=cuda-builder /opt/venv /opt/venv
WORKDIR /app
COPY ${MODEL_DIR} /app/model
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    UNIGUARD_HOST=0.0.0.0 \
    UNIGUARD_PORT=8000 \
    UNIGUARD_MODEL_DIR=/app/model \
    UNIGUARD_PROVIDER=cuda
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('UNIGUARD_PORT', '8000'), timeout=4)"]
# Exec form: `uniguard serve` (uvicorn in-process) is PID 1 and receives SIGTERM directly; it drains, then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["uniguard", "serve"]

# ---------------------------------------------------------------------------------------------------------------------
# cpu (default target): slim Python, ONNX Runtime CPU, the default model baked in, non-root.
# The default policies ship inside the installed package; custom ones are mounted and listed in UNIGUARD_POLICY_DIRS.
FROM ${PYTHON_IMAGE} AS cpu
ARG MODEL_DIR
RUN groupadd --system --gid 10001 uniguard \
    && useradd --system --uid 10001 --gid uniguard --home-dir /app --shell /usr/sbin/nologin uniguard
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY ${MODEL_DIR} /app/model
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    UNIGUARD_HOST=0.0.0.0 \
    UNIGUARD_PORT=8000 \
    UNIGUARD_MODEL_DIR=/app/model \
    UNIGUARD_PROVIDER=cpu
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('UNIGUARD_PORT', '8000'), timeout=4)"]
# Exec form: `uniguard serve` (uvicorn in-process) is PID 1 and receives SIGTERM directly; it drains, then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["uniguard", "serve"]
