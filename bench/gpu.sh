#!/usr/bin/env bash
# The one prepared GPU benchmark (one H200, under 8 minutes), and its CPU
# dry run:
#
#   bash bench/gpu.sh             # on the GPU machine; figures in $OUT
#   bash bench/gpu.sh --dry-run   # here: every stage on CPU, tiny models
#
# The GPU machine's image has torch (CUDA), transformers, onnxruntime,
# Triton and numpy, and reaches no package registry: this script installs
# the wheels carried in .whl/ (bench/fetch_gpu_wheels.sh, list in
# bench/gpu-wheels.txt) into a scratch folder with
# `pip install --no-index --no-deps --target`, and runs from the source tree
# (PYTHONPATH; no `pip install -e`, whose pins that image cannot meet).
# The dry run imports only what that image has (linked from this
# interpreter, `python -S`) plus the carried wheels, so a missing wheel fails
# it here first.
#
# Stages, one process each, each under its own `timeout` and within a total
# budget (BUDGET_S, default 450 s); each writes $OUT/<stage>.json as it goes
# and $OUT/summary.json is rewritten after every stage:
#   env; tests (pytest -m gpu); percall (ms per call vs batch 1..64 per
#   expert: eager, cuda_graphs, torch_compile; bf16); engine (step, request,
#   none at 1, 8, 32 clients, 3 requests per client, max batch 64, eager and
#   CUDA graphs, bf16, efficiency vs the max-batch compute rate of the same
#   run); tensorrt (bf16 engines, same load; skipped without TensorRT);
#   realsize (SD 1.5 at 512 px and SDXL at 1024 px UNet architectures with
#   random weights, imported with `ediffi import diffusers`, our engine with
#   CUDA graphs next to diffusers' own pipeline one request at a time and at
#   static batches 1..16; it needs more than what the budget leaves after the
#   stages before it: run it alone with STAGES=env,realsize).
#
# Environment: PYTHON (default python3; the dry run: .venv/bin/python if
# present), OUT (default bench/results/gpu-<UTC time>; dry run: a temp dir),
# MODEL_DIR (default models/default), BUDGET_S, SITE (wheel install folder),
# STAGES (comma-separated subset), REALSIZE_ARCHS (default sd15,sdxl).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ "$DRY_RUN" == 1 && -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [[ "$DRY_RUN" == 1 ]]; then
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/ediffi-gpu-dry.XXXXXX")}"
else
  OUT="${OUT:-$ROOT/bench/results/gpu-$STAMP}"
fi
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-450}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/ediffi-gpu.XXXXXX")"
SITE="${SITE:-$SCRATCH/site}"
STARTED=$SECONDS
echo "== bench/gpu.sh ($([[ $DRY_RUN == 1 ]] && echo 'dry run, CPU' || echo GPU)): results in $OUT"

# -- carried wheels ---------------------------------------------------------
mapfile -t REQS < <(grep -Ev '^\s*(#|$)' bench/gpu-wheels.txt)
LINK_CARRIED=()
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing ${#REQS[@]} carried wheels into $SITE"
  if ! "$PY" -m pip install --quiet --no-index --no-deps --find-links .whl --target "$SITE" "${REQS[@]}"; then
    echo "error: the carried wheels in .whl/ do not install for $("$PY" -V 2>&1); run bench/fetch_gpu_wheels.sh" >&2
    exit 3
  fi
elif [[ "$DRY_RUN" == 1 ]]; then
  echo "== no .whl/ here (bench/fetch_gpu_wheels.sh fetches it): the dry run links the carried packages from $PY instead"
  LINK_CARRIED=(--link-carried)
else
  echo "error: no carried wheels in .whl/: run bench/fetch_gpu_wheels.sh before sending the tree to the GPU machine" >&2
  exit 3
fi
mkdir -p "$SITE"

if [[ "$DRY_RUN" == 1 ]]; then
  BARE="$SCRATCH/image"
  "$PY" bench/gpu_stages.py bare-env --dir "$BARE" --out "$OUT/bare-env.json" "${LINK_CARRIED[@]}" || exit 3
  RUN=("$PY" -S)  # no site-packages: only the tree, the carried wheels and the image's packages
  export PYTHONPATH="$ROOT:$SITE:$BARE"
  DEVICE=cpu DTYPE=float32 MAX_BATCH=4 BATCHES=1,2,4 COMPILE_BATCHES=1,4 REPEATS=2 CLIENTS=2 MIN_STEPS=2 MAX_STEPS=3
  MODEL_DIR="$SCRATCH/tiny-model"
else
  RUN=("$PY")
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  DEVICE=cuda DTYPE=bfloat16 MAX_BATCH=64 BATCHES=1,2,4,8,16,32,64 COMPILE_BATCHES=1,8,64 REPEATS=20 CLIENTS=1,8,32
  MIN_STEPS=8 MAX_STEPS=16
  MODEL_DIR="${MODEL_DIR:-$ROOT/models/default}"
fi

# -- stages -------------------------------------------------------------------
FAILED=()
declare -A RC SECS
ORDER=()
write_summary() {
  local rows="" name
  for name in "${ORDER[@]}"; do rows+="$name ${RC[$name]} ${SECS[$name]}"$'\n'; done
  ROWS="$rows" OUT_DIR="$OUT" DRY="$DRY_RUN" TOTAL="$((SECONDS - STARTED))" "${RUN[@]}" - <<'EOF'
import json, os
rows = [line.split() for line in os.environ["ROWS"].splitlines() if line.strip()]
meaning = {"0": "ok", "124": "timed out", "137": "killed (timeout)", "skip": "not run: out of time"}
stages = [{"stage": n, "exit": rc, "result": meaning.get(rc, "failed"), "seconds": int(s), "json": f"{n}.json"} for n, rc, s in rows]
summary = {"dry_run": os.environ["DRY"] == "1", "total_seconds": int(os.environ["TOTAL"]), "stages": stages}
path = os.path.join(os.environ["OUT_DIR"], "summary.json")
with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
os.replace(path + ".tmp", path)
EOF
}

# stage NAME LIMIT_S ARGS...: run one stage under min(LIMIT_S, what is left of the budget).
# STAGES=a,b,c runs only those (e.g. STAGES=env,realsize for the real-size networks alone).
stage() {
  local name="$1" limit="$2"; shift 2
  if [[ -n "${STAGES:-}" && ",$STAGES," != *",$name,"* ]]; then return; fi
  local left=$((BUDGET_S - (SECONDS - STARTED)))
  ORDER+=("$name")
  if (( left < 15 )); then
    echo "== $name: skipped, ${left}s left of the ${BUDGET_S}s budget"
    RC[$name]=skip; SECS[$name]=0; FAILED+=("$name(out of time)"); write_summary; return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "${RUN[@]}" bench/gpu_stages.py "$@" --out "$OUT/$name.json"
  local rc=$?
  RC[$name]=$rc; SECS[$name]=$((SECONDS - t0))
  (( rc != 0 )) && FAILED+=("$name(exit $rc)")
  write_summary
}

COMMON=(--model-dir "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" --max-batch "$MAX_BATCH")
LOAD=(--clients "$CLIENTS" --requests-per-client 3 --min-steps "$MIN_STEPS" --max-steps "$MAX_STEPS")

if [[ "$DRY_RUN" == 1 ]]; then stage model 60 model --dir "$MODEL_DIR"; fi
ENV_ARGS=(); [[ "$DRY_RUN" == 0 ]] && ENV_ARGS=(--require-cuda)
stage env 30 env "${ENV_ARGS[@]}"
if [[ "$DRY_RUN" == 0 && "${RC[env]:-0}" != 0 ]]; then
  echo "error: no usable CUDA device (see $OUT/env.json); nothing else is worth running" >&2
  exit 1
fi
stage tests 120 tests tests/engines/test_gpu_cuda_graphs.py tests/export/test_tensorrt_build.py
stage percall-eager 40 percall "${COMMON[@]}" --mode eager --batches "$BATCHES" --repeats "$REPEATS"
stage percall-cuda_graphs 50 percall "${COMMON[@]}" --mode cuda_graphs --batches "$BATCHES" --repeats "$REPEATS"
stage engine-cuda_graphs 75 engine "${COMMON[@]}" "${LOAD[@]}" --compile cuda_graphs
stage engine-eager 75 engine "${COMMON[@]}" "${LOAD[@]}" --compile none
stage percall-torch_compile 75 percall "${COMMON[@]}" --mode torch_compile --batches "$COMPILE_BATCHES" --repeats "$REPEATS"
stage tensorrt 90 tensorrt "${COMMON[@]}" "${LOAD[@]}" --work-dir "$SCRATCH/tensorrt"
if [[ "$DRY_RUN" == 1 ]]; then
  REALSIZE=(--archs tiny-sd --steps 2 --clients 1 --diffusers-batches 1,2)
else
  REALSIZE=(--archs "${REALSIZE_ARCHS:-sd15,sdxl}" --steps 10 --clients 1,8,32 --diffusers-batches 1,2,4,8,16)
fi
stage realsize 300 realsize "${COMMON[@]}" "${REALSIZE[@]}" --work-dir "$SCRATCH/realsize"

echo "== done in $((SECONDS - STARTED))s: $OUT/summary.json"
rm -rf "$SCRATCH"
if (( ${#FAILED[@]} )); then
  echo "stages that did not finish cleanly: ${FAILED[*]}" >&2
  exit 1
fi
