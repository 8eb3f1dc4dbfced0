#!/usr/bin/env bash
# Train the shapes-world model and export it. Encoders first; then the base
# expert tree and the SR tree as two processes side by side (one per core on
# the 2-core VM, sharing the device on a GPU); the single-model baseline
# starts once the base root has finished (it continues the root) and runs
# beside the base splits. Both model directories land in RUN_DIR/export.
# Resumable: rerun the same command after an interruption.
# BUDGET_S (e.g. a lent GPU's counted time): every phase stops by then
# (`ediffi train --time-budget-s`), the encoders within a tenth of it, and
# 45 s are left for the exports; the log records the steps taken.
# Usage: scripts/train_shapes.sh [RUN_DIR] [CONFIG] [BUDGET_S]
set -euo pipefail
export TOKENIZERS_PARALLELISM=false  # DataLoader workers fork after the tokenizers ran
run_dir=${1:-runs/shapes}
config=${2:-configs/shapes-train.json}
budget=${3:-}
ediffi=${EDIFFI:-.venv/bin/ediffi}
mkdir -p "$run_dir"
start=$(date +%s)
# --time-budget-s that leaves $1 seconds of the budget at the end (nothing without a budget)
until_left() { [ -z "$budget" ] || echo "--time-budget-s $(( budget - ($(date +%s) - start) - $1 ))"; }
train() { $ediffi train --run-dir "$run_dir" --config "$config" "$@"; }

train --chains $(until_left $(( ${budget:-0} * 9 / 10 )))   # encoders only
train --chains base $(until_left 45) > "$run_dir/base.out" 2>&1 &
base_pid=$!
train --chains sr $(until_left 45) > "$run_dir/sr.out" 2>&1 &
sr_pid=$!
# The base root's last log record says it finished, after its checkpoint.
until grep -qs '"phase": "base_root".*"finished": true' "$run_dir/train.log.jsonl"; do
  kill -0 "$base_pid" 2>/dev/null || { wait "$base_pid"; exit $?; }
  sleep 5
done
train --chains baseline $(until_left 45) > "$run_dir/baseline.out" 2>&1 &
baseline_pid=$!
wait "$base_pid" "$sr_pid" "$baseline_pid"
train --export "$run_dir/export/default"
train --export "$run_dir/export/baseline_model" --baseline
echo "training finished in $(( $(date +%s) - start )) s: $run_dir/export"
