# syntax=docker/dockerfile:1.7
#
# eDiff-I serving images. Two final targets:
#
#   docker build --target cpu -t ediffi:cpu .     # python:3.11-slim + CPU torch (API, laptops, CI)
#   docker build --target gpu -t ediffi:gpu .     # CUDA base + CUDA torch (workers)
#   docker build --target gpu --build-arg WITH_TENSORRT=1 -t ediffi:gpu-trt .
#                                                 # + TensorRT and ONNX, to build engines in the container
#
# Both run as the non-root user `ediffi` (uid 10001), carry the shipped model
# at /app/models/default (EDIFFI_MODEL_DIR), and start `ediffi` (ENTRYPOINT)
# with `serve` (CMD); compose and Kubernetes pass `api` or `worker` instead.
# Host and ports come from EDIFFI_HOST / EDIFFI_PORT / EDIFFI_METRICS_PORT
# (set those rather than --port flags): the HEALTHCHECK reads the same
# variables and probes /healthz on EDIFFI_PORT, or /metrics on
# EDIFFI_METRICS_PORT when the container runs `worker` (no HTTP API there).
# Without --target, `docker build` builds the last stage: gpu.
#
# hadolint: no rule is ignored. (No apt-get in any stage: torch, Pillow and
# tokenizers wheels bundle their native libraries, and the CUDA base already
# has what the CUDA wheels need.)

ARG PYTHON_VERSION=3.11
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CUDA 13.0 runtime libraries come with the torch cu130 wheels (nvidia-* pip
# packages); the CUDA `base` image adds the driver hooks and labels
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_REQUIRE_CUDA) and stays small. Needs a host
# driver >= 580. For CUDA 12: CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04,
# TORCH_INDEX_URL=.../whl/cu128, TENSORRT_PACKAGE=tensorrt-cu12.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

# --------------------------------------------------------------------- helpers
FROM ${UV_IMAGE} AS uv

# Requirements from pyproject.toml (torch excluded: each target installs its
# own build first). Its own layer so that code edits don't reinstall them.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.replace(' ', '').startswith('torch')))" > requirements.txt

# ------------------------------------------------------------------ CPU build
FROM ${PYTHON_IMAGE} AS cpu-builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt
WORKDIR /src
# The whole (allow-listed, see .dockerignore) context: pyproject.toml, README.md
# and the packages (and the model, unused here; the runtime copies it itself).
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . && pip check

# ------------------------------------------------------------------ GPU build
# Ubuntu 24.04 has no Python 3.11 package: uv installs a standalone CPython
# 3.11 under /opt/python, and the venv at /opt/venv points at it; the runtime
# stage copies both to the same paths.
FROM ${CUDA_IMAGE} AS gpu-builder
ARG PYTHON_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG WITH_TENSORRT=0
ARG TENSORRT_PACKAGE=tensorrt-cu13
ARG TENSORRT_VERSION=11.4.0.106
ARG ONNX_VERSION=1.23.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
RUN uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
# TensorRT from NVIDIA's wheels (they bundle libnvinfer for the CUDA major
# version named in the package) and ONNX for the export, only when asked for:
# they add ~2 GB.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt \
 && if [ "${WITH_TENSORRT}" = "1" ]; then \
      pip install "${TENSORRT_PACKAGE}==${TENSORRT_VERSION}" "onnx==${ONNX_VERSION}"; \
    fi
WORKDIR /src
# The whole (allow-listed, see .dockerignore) context: pyproject.toml, README.md
# and the packages (and the model, unused here; the runtime copies it itself).
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . && pip check

# --------------------------------------------------------------- CPU runtime
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 ediffi \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ediffi \
      --shell /usr/sbin/nologin ediffi \
 && mkdir -p /app/engines \
 && chown ediffi:ediffi /app/engines
COPY --from=cpu-builder /opt/venv /opt/venv
COPY models/default /app/models/default
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    EDIFFI_MODEL_DIR=/app/models/default \
    EDIFFI_DEVICE=cpu \
    EDIFFI_HOST=0.0.0.0 \
    EDIFFI_PORT=8000 \
    EDIFFI_METRICS_PORT=9100
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; e = os.environ.get; w = b'worker' in open('/proc/1/cmdline', 'rb').read().split(b'\\0'); r.urlopen('http://127.0.0.1:%s/%s' % ((e('EDIFFI_METRICS_PORT', '9100'), 'metrics') if w else (e('EDIFFI_PORT', '8000'), 'healthz')), timeout=4)"]
ENTRYPOINT ["ediffi"]
CMD ["serve"]

# --------------------------------------------------------------- GPU runtime
FROM ${CUDA_IMAGE} AS gpu
RUN groupadd --system --gid 10001 ediffi \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ediffi \
      --shell /usr/sbin/nologin ediffi \
 && mkdir -p /app/engines \
 && chown ediffi:ediffi /app/engines
COPY --from=gpu-builder /opt/python /opt/python
COPY --from=gpu-builder /opt/venv /opt/venv
COPY models/default /app/models/default
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    EDIFFI_MODEL_DIR=/app/models/default \
    EDIFFI_DEVICE=cuda \
    EDIFFI_HOST=0.0.0.0 \
    EDIFFI_PORT=8000 \
    EDIFFI_METRICS_PORT=9100
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; e = os.environ.get; w = b'worker' in open('/proc/1/cmdline', 'rb').read().split(b'\\0'); r.urlopen('http://127.0.0.1:%s/%s' % ((e('EDIFFI_METRICS_PORT', '9100'), 'metrics') if w else (e('EDIFFI_PORT', '8000'), 'healthz')), timeout=4)"]
ENTRYPOINT ["ediffi"]
CMD ["serve"]
