# syntax=docker/dockerfile:1
# The operator image: kopf, the kubernetes client and the contract package (xling.api: the experiment spec,
# tags, errors), and no torch, Ray or DeepSpeed. trainer/ is copied because the project installs as one
# distribution; the operator imports none of it (tests/test_architecture.py). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t xling-operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: install the project (operator extra only) into a virtualenv ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY api/ api/
COPY trainer/ trainer/
COPY operator/ operator/
# requirements.lock pins every transitive version; the `train` extra (torch, Ray, ...) is not installed.
RUN pip install -c requirements.lock ".[operator]" \
 && python -c "import importlib.metadata as m, sys; heavy = {d.metadata['Name'].lower() for d in m.distributions()} & {'torch', 'ray', 'deepspeed'}; sys.exit(f'unexpected in the operator image: {heavy}' if heavy else 0)" \
 && python -c "import kopf, kubernetes, xling.operator.handlers"

# --- runtime: the virtualenv on a clean slim base, as a non-root user ---
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="xling-operator" \
      org.opencontainers.image.description="kopf operator: RetrievalExperiment -> KubeRay RayJob" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# Numeric UID/GID so runAsNonRoot can verify them; the chart runs it with a read-only root filesystem.
USER 10001:10001
# kopf's liveness endpoint (see helm/xling values operator.healthPort).
EXPOSE 8080
ENTRYPOINT ["python", "-m", "xling.operator"]
