# Two commands do everything on a fresh machine (Python 3.11 + pip, no GPU, no model hub):
#   make demo   set up, then run the demo experiment (local Ray, bundled data, e5-small, local MLflow)
#   make test   set up, then run the test suite (what CI runs)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export PYTHONWARNINGS ?= ignore::FutureWarning
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HELM_CACHE_HOME ?= $(CURDIR)/.cache/helm/cache
export HELM_CONFIG_HOME ?= $(CURDIR)/.cache/helm/config
export HELM_DATA_HOME ?= $(CURDIR)/.cache/helm/data

.PHONY: setup demo test lint model tools crds mlflow clean

# torch first, pinned to the CPU build: otherwise deepspeed/transformers pull a multi-GB CUDA torch.
$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.lock -e '.[train,operator,test]'
	touch $@

setup: $(BIN)/.installed tools

tools: bin/helm bin/hadolint

bin/helm bin/hadolint:
	bash tools/install_k8s_tools.sh bin

model: setup
	$(BIN)/python -m xling.trainer.demo_model ensure

demo: setup model
	$(BIN)/xling run manifests/samples/demo.yaml

test: setup model
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -ra --durations=15

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

crds: setup
	$(BIN)/python -m xling.operator.crd manifests/crds helm/xling/values.schema.json && cp manifests/crds/*.yaml helm/xling/crds/

mlflow: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf .cache runs mlruns mlflow.db
