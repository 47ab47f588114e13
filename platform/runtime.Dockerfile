# syntax=docker/dockerfile:1.7
# The Keel runtime: one image for the KFP components, the MLflow server and
# the Ray head and worker pods (KubeRay runs `ray start` inside it).
#
#   make image                 CPU build, tagged ghcr.io/keel-mlops/keel-runtime:<version>
#   make image CUDA=1          CUDA build (torch's cu128 wheels bring the CUDA
#                              runtime; the node's driver comes from the NVIDIA
#                              container toolkit), tagged <version>-cuda
#
# Build context: the repository root.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY platform/keel platform/keel
COPY components components
COPY pipelines pipelines
# torch first, from the index of the chosen variant; then Keel with every
# dependency pinned by requirements.lock, with the `postgres` extra: the
# PostgreSQL driver (psycopg 3) the MLflow server opens its backend store with.
RUN python -m venv /opt/keel \
    && /opt/keel/bin/pip install --no-cache-dir "torch==2.13.0" \
       --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && /opt/keel/bin/pip install --no-cache-dir -c requirements.lock ".[postgres]" \
    && /opt/keel/bin/python -c "import keel, ray, mlflow, torch, psycopg; print(keel.__version__, ray.__version__, torch.__version__)"

FROM ${PYTHON_IMAGE}
ARG KEEL_VERSION=0.1.0
# The commit the image is built from (`make image` passes it): every MLflow run a step starts is tagged with it,
# so `keel models show` names the code a cluster-trained version came from.
ARG KEEL_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="keel-runtime" \
      org.opencontainers.image.revision="${KEEL_GIT_COMMIT}" \
      org.opencontainers.image.description="Keel components, MLflow server and Ray pods" \
      org.opencontainers.image.source="https://github.com/keel-mlops/keel" \
      org.opencontainers.image.version="${KEEL_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# KubeRay's health probes call wget inside Ray containers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "wget=1.21.3-1+deb12u1" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 keel \
    && useradd --uid 10001 --gid keel --home-dir /tmp --no-create-home --shell /usr/sbin/nologin keel
COPY --from=build /opt/keel /opt/keel
# HOME and KEEL_HOME under /tmp: the chart mounts the root filesystem read-only
# and /tmp as a writable emptyDir.
ENV PATH=/opt/keel/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    KEEL_HOME=/tmp/keel \
    KEEL_GIT_COMMIT=${KEEL_GIT_COMMIT} \
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /tmp
CMD ["keel", "--help"]
