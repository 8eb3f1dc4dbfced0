#!/usr/bin/env bash
# Train the shipped shapes-world model on a 2-core machine: one single-thread
# process per core. Encoders first; then the base expert tree and the SR tree
# side by side; the single-model baseline starts once the base root has
# finished (it continues the root) and runs beside the base splits.
# Resumable: rerun the same command after an interruption.
# Usage: scripts/train_shapes.sh [RUN_DIR] [CONFIG]
set -euo pipefail
run_dir=${1:-runs/shapes}
config=${2:-configs/shapes-train.json}
ediffi=${EDIFFI:-.venv/bin/ediffi}
mkdir -p "$run_dir"

"$ediffi" train --run-dir "$run_dir" --config "$config" --chains   # encoders only
"$ediffi" train --run-dir "$run_dir" --config "$config" --chains base > "$run_dir/base.out" 2>&1 &
base_pid=$!
"$ediffi" train --run-dir "$run_dir" --config "$config" --chains sr > "$run_dir/sr.out" 2>&1 &
sr_pid=$!
until "${PYTHON:-.venv/bin/python}" -c "
import sys; from pathlib import Path; from ediffi.train import Checkpoints
sys.exit(0 if Checkpoints(Path('$run_dir')).done('base_root') else 1)" 2>/dev/null; do
  kill -0 "$base_pid" 2>/dev/null || { wait "$base_pid"; exit $?; }
  sleep 60
done
"$ediffi" train --run-dir "$run_dir" --config "$config" --chains baseline > "$run_dir/baseline.out" 2>&1 &
baseline_pid=$!
wait "$base_pid" "$sr_pid" "$baseline_pid"
echo "training finished: $run_dir"
