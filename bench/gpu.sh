#!/usr/bin/env bash
# GPU checks: e5-small hybrid bf16 throughput/MFU, a ~1.3B XLM-R-shaped encoder under ZeRO-3 (tokens/s, MFU,
# peak memory vs `xling plan`), XQuAD-R evaluation (GPU faiss if it installs, else CPU faiss). One CUDA GPU;
# without one it prints "no CUDA GPU: skipped" and exits 0. Total budget: GPU_CHECKS_BUDGET_S (default 460 s).
#   bash bench/gpu.sh            # find/prepare a Python env, then run bench/gpu_checks.py, print a summary
#   bash bench/gpu.sh --stage    # only take in the carried part(s) (bench/gpu_stage.py) and say what is still missing
# Staged parts arrive in .gpu/stage/ of the checkout (carried, one or two a call) and are kept, with everything
# built from them, under $XLING_GPU_DIR (default /tmp/xling-gpu): outside the checkout, the one place that
# survives between device calls.
set -euo pipefail
START=$(date +%s)
BUDGET=${GPU_CHECKS_BUDGET_S:-460}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Between device calls only files outside the checkout survive: parts, packages and the e5 model live here
GPU=${XLING_GPU_DIR:-/tmp/xling-gpu}
CARRIED=$REPO/.gpu/stage   # what this call carried (bench/gpu_stage.py's MANIFEST and part(s))
MODE=${1:-run}
left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "gpu.sh: $*"; }

NVSMI=${XLING_NVIDIA_SMI:-nvidia-smi}
if ! command -v "$NVSMI" >/dev/null 2>&1 || ! GPU_NAME=$("$NVSMI" --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) \
   || [ -z "$GPU_NAME" ]; then
  echo "no CUDA GPU: skipped"
  exit 0
fi
say "GPU: $GPU_NAME ($(date -u +%F)), $(nproc) cores"
df -h "$REPO" /tmp 2>/dev/null | sed 's/^/gpu.sh: /' || true

# ---- staged parts (bench/gpu_stage.py): take in what this call carried, reassemble once all are here
mkdir -p "$GPU/stage"
if [ -f "$CARRIED/MANIFEST" ]; then
  if [ -f "$GPU/stage/MANIFEST" ] && ! cmp -s "$CARRIED/MANIFEST" "$GPU/stage/MANIFEST"; then
    say "a new MANIFEST: the parts of the old one are dropped"
    rm -rf "$GPU/stage" "$GPU/unpacked" "$GPU/site" && mkdir -p "$GPU/stage"
  fi
  cp "$CARRIED/MANIFEST" "$GPU/stage/MANIFEST"
  while read -r kind sum name; do
    [ "$kind" = part ] && [ -f "$CARRIED/$name" ] || continue
    if echo "$sum  $CARRIED/$name" | sha256sum -c --quiet - >/dev/null 2>&1; then
      cp "$CARRIED/$name" "$GPU/stage/$name" && say "took in $name"
    else
      say "$name: sha256 differs from the MANIFEST: not taken"
    fi
  done <"$CARRIED/MANIFEST"
fi
stage_status() {  # prints missing part names; returns 0 when complete
  local missing=0
  while read -r kind sum name; do
    [ "$kind" = part ] || continue
    if [ ! -f "$GPU/stage/$name" ] || ! echo "$sum  $GPU/stage/$name" | sha256sum -c --quiet - >/dev/null 2>&1; then
      echo "$name"; missing=1
    fi
  done <"$GPU/stage/MANIFEST"
  return $missing
}
if [ -f "$GPU/stage/MANIFEST" ] && ! cmp -s "$GPU/stage/MANIFEST" "$GPU/unpacked/MANIFEST" 2>/dev/null; then
  if missing=$(stage_status); then
    read -r _ tar_sum _ < <(grep '^tar ' "$GPU/stage/MANIFEST")
    cat "$GPU"/stage/part-* >"$GPU/stage.tar"
    if echo "$tar_sum  $GPU/stage.tar" | sha256sum -c --quiet - >/dev/null 2>&1; then
      say "all staged parts here, the reassembled tar matches its sha256: unpacking"
      rm -rf "$GPU/unpacked" "$GPU/site" && mkdir -p "$GPU/unpacked"
      tar -x -C "$GPU/unpacked" -f "$GPU/stage.tar"
      cp "$GPU/stage/MANIFEST" "$GPU/unpacked/MANIFEST"
    else
      say "the reassembled tar does not match the MANIFEST's sha256: not unpacked"
    fi
    rm -f "$GPU/stage.tar"
  else
    say "staged parts still missing: $(echo "$missing" | tr '\n' ' ')"
  fi
fi
if [ "$MODE" = --stage ]; then
  say "stage mode: parts present: $(ls "$GPU/stage" 2>/dev/null | grep -c '^part-' || true); nothing run"
  exit 0
fi

# ---- a Python with CUDA torch
PY=""
for cand in ${XLING_GPU_PYTHON:-} "$REPO/.venv/bin/python" python3 python; do
  command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
  line=$(cd /tmp && "$cand" -c 'import torch;print(torch.__version__, torch.cuda.is_available())' 2>/dev/null) || continue
  say "$cand: torch $line"
  if [ "${line##* }" = True ]; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  say "no Python with CUDA torch found (tried \$XLING_GPU_PYTHON, .venv, python3): nothing run"
  exit 0
fi

# ---- the project and its packages: staged wheels, then .whl/ (the device README's convention), then an index
SITE=$GPU/site
mkdir -p "$SITE/xling"
ln -sfn "$REPO/trainer" "$SITE/xling/trainer"     # xling is a namespace: the same layout `pip install -e .` maps
ln -sfn "$REPO/operator" "$SITE/xling/operator"
ln -sfn "$REPO/api" "$SITE/xling/api"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
PIPI=("$PY" -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$SITE" --upgrade)
if [ -d "$GPU/unpacked/wheels" ] && [ ! -f "$SITE/.staged" ]; then
  say "installing $(ls "$GPU/unpacked/wheels" | wc -l) staged packages"
  (cd /tmp && "${PIPI[@]}" --no-index "$GPU"/unpacked/wheels/*.whl) || say "staged wheels: install failed"
  for sd in "$GPU"/unpacked/wheels/*.tar.gz; do  # DeepSpeed: built here, against this CUDA torch
    [ -f "$sd" ] && (cd /tmp && DS_BUILD_OPS=0 timeout 180 "${PIPI[@]}" --no-index --no-build-isolation "$sd") \
      || say "$(basename "$sd"): build failed"
  done
  touch "$SITE/.staged"
fi
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  (cd /tmp && "${PIPI[@]}" --no-index "$REPO"/.whl/*.whl) || say ".whl/: install failed"
fi
check() { (cd /tmp && "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
); }
MISSING=$(check pydantic yaml transformers tokenizers ray deepspeed mlflow faiss)
INDEX=no
if (cd /tmp && timeout 15 "$PY" -m pip download -q --no-deps -d /tmp/xling-pip-probe hjson==3.1.0 >/dev/null 2>&1); then
  INDEX=yes
fi
say "package index reachable: $INDEX"
if [ -n "$MISSING" ] && [ $INDEX = yes ]; then
  say "installing from the index: $MISSING"
  (cd /tmp && timeout 240 "$PY" -m pip install -q -c "$REPO/requirements.lock" 'pydantic>=2.7,<3' pyyaml \
     'ray[default,train,tune]' mlflow faiss-cpu deepspeed) || say "index install failed"
  MISSING=$(check pydantic yaml transformers tokenizers ray deepspeed mlflow faiss)
fi
[ -n "$MISSING" ] && say "MISSING Python packages: $MISSING (stage them: python bench/gpu_stage.py, see docs/distributed.md)"
if [ $INDEX = yes ]; then
  (cd /tmp && timeout 120 "$PY" -m pip install -q faiss-gpu-cu12 >/dev/null 2>&1) && say "faiss-gpu-cu12 installed" \
    || say "faiss-gpu-cu12 did not install: CPU faiss"
else
  say "faiss-gpu: no package index: CPU faiss"
fi

# ---- environment for the runs: GPU DeepSpeed, offline hub, a fresh Ray
unset DS_ACCELERATOR
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore::FutureWarning \
  PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$GPU/torch_extensions
SKIP=()
has() { case " $MISSING " in *" $1 "*) return 1 ;; esac; }
for m in pydantic yaml transformers tokenizers; do
  has $m || { say "cannot run any section without $m"; SKIP=(--sections ""); }
done
if ! has ray || ! has mlflow; then SKIP+=(--skip "train=needs ray and mlflow" --skip "zero3=needs ray and mlflow"); fi
has deepspeed || SKIP+=(--skip "zero3=needs deepspeed" --skip "step=needs deepspeed")
has faiss || SKIP+=(--skip "eval=needs faiss")

# e5-small: staged wheels -> $XLING_CACHE/wheels (outside the checkout), then the project's own conversion
export XLING_CACHE=$GPU/cache
if [ -d "$GPU/unpacked/e5" ]; then mkdir -p "$XLING_CACHE/wheels" && cp -n "$GPU"/unpacked/e5/*.whl "$XLING_CACHE/wheels/" || true; fi
if ! has pydantic || ! E5=$(cd /tmp && timeout 120 "$PY" -c 'import sys; from xling.trainer.demo_model import main; sys.exit(main(["ensure"]))' 2>/tmp/e5.err | tail -1) || [ -z "$E5" ]; then
  say "multilingual-e5-small unavailable ($(tail -c 300 /tmp/e5.err 2>/dev/null | tr '\n' ' ')): train and eval skipped"
  SKIP+=(--skip "train=no multilingual-e5-small (stage its wheels: bench/gpu_stage.py)" --skip "eval=no multilingual-e5-small")
else
  say "e5-small at $E5"
fi

REMAIN=$(left)
say "running bench/gpu_checks.py with $REMAIN s left"
set +e
(cd /tmp && "$PY" "$REPO/bench/gpu_checks.py" --budget-s "$REMAIN" "${SKIP[@]}" 2>&1) | tee /tmp/gpu-checks.log
rc=${PIPESTATUS[0]}
set -e
[ -n "${OUT:-}" ] && { cp /tmp/gpu-checks.log "$OUT/gpu-checks.log" 2>/dev/null || true; }
say "done in $(($(date +%s) - START)) s (rc $rc)"
exit "$rc"
