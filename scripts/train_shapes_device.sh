#!/usr/bin/env bash
# Train the shapes-world model on one CUDA device within a fixed wall-clock
# budget (a lent GPU machine's time is counted): encoders first, then the base
# expert tree and the SR tree as two processes sharing the GPU, and the
# single-model baseline beside the base splits once the base root is done.
# Every phase stops by the deadline (`ediffi train --time-budget-s`), sharing
# the time by its steps, and records the steps it took; then both model
# directories are exported.
# Usage: scripts/train_shapes_device.sh RUN_DIR CONFIG BUDGET_S [EXPORT_DIR]
set -euo pipefail
export TOKENIZERS_PARALLELISM=false  # DataLoader workers fork after the tokenizers ran
run_dir=$1
config=$2
budget=$3
export_dir=${4:-$run_dir/export}
ediffi=${EDIFFI:-ediffi}
python=${PYTHON:-python3}
mkdir -p "$run_dir" "$export_dir"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

# Encoders get a tenth of the budget at most.
$ediffi train --run-dir "$run_dir" --config "$config" --chains --time-budget-s $(( budget / 10 ))
# The exports need ~45 s at the end.
train_s=$(( $(left) - 45 ))
$ediffi train --run-dir "$run_dir" --config "$config" --chains base --time-budget-s "$train_s" > "$run_dir/base.out" 2>&1 &
base_pid=$!
$ediffi train --run-dir "$run_dir" --config "$config" --chains sr --time-budget-s "$train_s" > "$run_dir/sr.out" 2>&1 &
sr_pid=$!
until $python -c "
import sys; from pathlib import Path; from ediffi.train import Checkpoints
sys.exit(0 if Checkpoints(Path('$run_dir')).done('base_root') else 1)" 2>/dev/null; do
  kill -0 "$base_pid" 2>/dev/null || { wait "$base_pid"; exit $?; }
  sleep 5
done
$ediffi train --run-dir "$run_dir" --config "$config" --chains baseline --time-budget-s $(( $(left) - 45 )) > "$run_dir/baseline.out" 2>&1 &
baseline_pid=$!
wait "$base_pid" "$sr_pid" "$baseline_pid"
$ediffi train --run-dir "$run_dir" --config "$config" --export "$export_dir/default"
$ediffi train --run-dir "$run_dir" --config "$config" --export "$export_dir/baseline_model" --baseline
echo "training finished in $(( $(date +%s) - start )) s: $export_dir"
