#!/usr/bin/env bash
# One command on a GPU machine: the GPU tests, then eager vs compiled (CUDA
# graphs per batch bucket) images/s of the torch backend through the engine,
# for the step and none batching policies, and the step-vs-none ratio.
# TensorRT and ONNX Runtime-GPU are benchmarked too when they are installed.
#
#   bench/gpu.sh                       # defaults below
#   REQUESTS=64 CLIENTS=32 bench/gpu.sh
#
# Installs nothing. Needs a Python with a CUDA build of torch and this
# project's dependencies: $PYTHON, else .venv/bin/python, else python3.
# Model: $MODEL_DIR, else models/default, else a random model with the
# default architecture (built under $SCRATCH, no download).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

REQUESTS="${REQUESTS:-32}"
CLIENTS="${CLIENTS:-16}"
MAX_BATCH="${MAX_BATCH:-16}"
MIN_STEPS="${MIN_STEPS:-8}"
MAX_STEPS="${MAX_STEPS:-16}"
DTYPE="${DTYPE:-float32}"
SCRATCH="${SCRATCH:-/tmp/ediffi-gpu-bench}"
RUN_TESTS="${RUN_TESTS:-1}"

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
"$PY" - <<'EOF'
import sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device: this script needs a GPU and a CUDA build of torch")
print(f"card: {torch.cuda.get_device_name(0)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})")
EOF

TESTS_RC=0
if [[ "$RUN_TESTS" == "1" ]]; then
  echo "== GPU tests"
  # A failing test is reported at the end; the figures still come out.
  "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu_cuda_graphs.py tests/test_tensorrt_build.py || TESTS_RC=$?
fi

echo "== bench (requests=$REQUESTS clients=$CLIENTS max_batch=$MAX_BATCH steps=$MIN_STEPS-$MAX_STEPS dtype=$DTYPE)"
REQUESTS="$REQUESTS" CLIENTS="$CLIENTS" MAX_BATCH="$MAX_BATCH" MIN_STEPS="$MIN_STEPS" MAX_STEPS="$MAX_STEPS" \
DTYPE="$DTYPE" SCRATCH="$SCRATCH" MODEL_DIR="${MODEL_DIR:-}" "$PY" - <<'EOF'
import os
import sys
from pathlib import Path

import torch

from engines.bench import LoadConfig, bench_model_dir, run_bench
from engines.cuda_graphs import CompiledTorchBackend
from engines.torch_backend import TorchBackend

env = os.environ
max_batch, dtype = int(env["MAX_BATCH"]), env["DTYPE"]
model_dir = Path(env["MODEL_DIR"]) if env.get("MODEL_DIR") else Path("models/default")
if not (model_dir / "model.json").is_file():
    model_dir = bench_model_dir(Path(env["SCRATCH"]) / "bench-model", seed=0)
    print(f"models/default is missing: a random model with its architecture at {model_dir}")
load = LoadConfig(clients=int(env["CLIENTS"]), requests=int(env["REQUESTS"]), min_steps=int(env["MIN_STEPS"]),
                  max_steps=int(env["MAX_STEPS"]), seed=0)
policies = ["step", "none"]
log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

backends = {
    "eager": lambda: TorchBackend(model_dir, device="cuda", dtype=dtype, max_batch=max_batch),
    "cuda_graphs": lambda: CompiledTorchBackend(model_dir, device="cuda", dtype=dtype, max_batch=max_batch, mode="cuda_graphs"),
}
try:
    from engines import trt_runtime

    if trt_runtime.available()[0]:
        def _trt():
            from engines.tensorrt_backend import TensorRTBackend
            from export.onnx_export import export_onnx
            from export.tensorrt_build import build_engines, make_profile

            out = Path(env["SCRATCH"]) / "trt"
            export_onnx(model_dir, out / "onnx", simplify=None, encoders=False, log=log)
            build_engines(out / "onnx", out / "engines", profile=make_profile(max_batch), precision="fp16", log=log)
            return TensorRTBackend(model_dir, tensorrt_dir=out / "engines", onnx_dir=out / "onnx", dtype="float16",
                                   max_batch=max_batch)
        backends["tensorrt_fp16"] = _trt
    else:
        print(f"tensorrt: skipped ({trt_runtime.available()[1]})")
except Exception as exc:  # the torch figures must come out regardless
    print(f"tensorrt: skipped ({type(exc).__name__}: {exc})")

results = {}
for name, make in backends.items():
    try:
        backend = make()
        backend.warmup()
        results[name] = {r.policy: r for r in run_bench(backend, policies, load, log=log)}
    except Exception as exc:
        print(f"{name}: FAILED ({type(exc).__name__}: {exc})")
    finally:
        backend = None
        torch.cuda.empty_cache()

print()
print(f"card {torch.cuda.get_device_name(0)}, model {model_dir}, {load.label}, {load.requests} requests, max batch {max_batch}, {dtype}")
print(f"{'backend':<15} {'policy':<6} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'mean batch':>10}")
for name, by_policy in results.items():
    for policy, r in by_policy.items():
        print(f"{name:<15} {policy:<6} {r.throughput_images_per_s:>9.2f} {r.latency_p50_s:>7.2f} {r.latency_p95_s:>7.2f} {r.mean_batch_size:>10.2f}")
print()
for name, by_policy in results.items():
    if {"step", "none"} <= set(by_policy):
        ratio = by_policy["step"].throughput_images_per_s / max(by_policy["none"].throughput_images_per_s, 1e-9)
        print(f"step-vs-none ratio, {name}: {ratio:.2f}x")
if "eager" in results:
    for name in results:
        if name == "eager":
            continue
        for policy in policies:
            if policy in results[name] and policy in results["eager"]:
                speedup = results[name][policy].throughput_images_per_s / max(results["eager"][policy].throughput_images_per_s, 1e-9)
                print(f"{name} vs eager, {policy}: {speedup:.2f}x")
if "eager" not in results or "cuda_graphs" not in results:
    sys.exit("error: the eager or the compiled torch bench failed (see above)")
EOF

if [[ "$TESTS_RC" != "0" ]]; then
  echo "GPU tests FAILED (pytest exit status $TESTS_RC): see above" >&2
  exit "$TESTS_RC"
fi
