# syntax=docker/dockerfile:1
# UniGuard service images.
#   CPU (default):  docker build -t uniguard:cpu .
#   CUDA:           docker build --build-arg RUNTIME=cuda -t uniguard:cuda .
# Both run `uniguard serve` with every setting from UNIGUARD_* environment variables (see docs/DEPLOYMENT.md).
# The two images differ only in the runtime base (RUNTIME selects runtime-cpu or runtime-cuda) and the ONNX Runtime
# package; every other step is written once. The image holds a Python runtime, the serving code (uniguard, policies,
# export, service, and scoring when present: no training/ or merging/ code, no JSONL data), the serving dependencies
# (no torch, no compilers), the model and the default policies.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG RUNTIME=cpu
# Exported model folder baked into the image (relative to the build context).
ARG MODEL_DIR=models/uniguard-minilm
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# ---------------------------------------------------------------------------------------------------------------------
# runtime bases: slim Python for the CPU image; the CUDA + cuDNN runtime with Ubuntu's Python for the CUDA image
# (needs the NVIDIA container runtime). Each sets the execution provider its image serves with.
FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV UNIGUARD_PROVIDER=cpu

FROM ${CUDA_IMAGE} AS runtime-cuda
ENV DEBIAN_FRONTEND=noninteractive \
    UNIGUARD_PROVIDER=cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------------------------
# sources: the build context, which .dockerignore reduces to an allow-list of exactly what the image needs: the
# serving packages (uniguard, policies, export, service, scoring), pyproject.toml, README.md and models/.
FROM scratch AS sources
COPY . /src/

# ---------------------------------------------------------------------------------------------------------------------
# builder: the package and its serving dependencies in a self-contained venv on the runtime's own Python (wheels
# only, nothing compiled); for CUDA, onnxruntime-gpu replaces onnxruntime. The check fails the build if torch or the
# training code got in.
# hadolint ignore=DL3006
FROM runtime-${RUNTIME} AS builder
ARG RUNTIME
ARG ONNXRUNTIME_GPU_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=sources /src /src
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-compile /src \
    && if [ "$RUNTIME" = "cuda" ]; then \
         /opt/venv/bin/pip uninstall -y onnxruntime \
         && /opt/venv/bin/pip install --no-cache-dir --no-compile "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"; \
       fi \
    && /opt/venv/bin/pip uninstall -y pip setuptools wheel \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'training', 'merging')))"

# ---------------------------------------------------------------------------------------------------------------------
# image (default target): the runtime base, the venv, the model, a non-root user.
# The default policies ship inside the installed package; custom ones are mounted and listed in UNIGUARD_POLICY_DIRS.
# hadolint ignore=DL3006
FROM runtime-${RUNTIME} AS image
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
    UNIGUARD_MODEL_DIR=/app/model
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('UNIGUARD_PORT', '8000'), timeout=4)"]
# Exec form: `uniguard serve` (uvicorn in-process) is PID 1 and receives SIGTERM directly; it drains, then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["uniguard", "serve"]
