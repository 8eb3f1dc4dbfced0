#!/usr/bin/env bash
# Train an exported shapes-world model's base experts (and its baseline)
# further within a wall-clock budget (e.g. a lent GPU's counted time): one
# process per phase, side by side, each stopping by the deadline; then export.
# Usage: [PHASES="base_high base_mid"] scripts/continue_shapes.sh MODEL_DIR BASELINE_DIR|- CONFIG BUDGET_S RUN_DIR EXPORT_DIR
# BASELINE_DIR "-": no baseline (PHASES must not name it).
set -euo pipefail
export TOKENIZERS_PARALLELISM=false  # DataLoader workers fork after the tokenizers ran
model=$1 baseline=$2 config=$3 budget=$4 run_dir=$5 export_dir=$6
phases=${PHASES:-base_high base_mid base_low baseline}
ediffi=${EDIFFI:-ediffi}
start=$(date +%s)
seed_args=(--continue-from "$model")
[ "$baseline" != - ] && seed_args+=(--continue-baseline "$baseline")
$ediffi train --run-dir "$run_dir" --config "$config" "${seed_args[@]}" --phases $phases
train_s=$(( budget - ($(date +%s) - start) - 40 ))  # the exports need ~40 s at the end
pids=()
for phase in $phases; do
  chain=base; [ "$phase" = baseline ] && chain=baseline
  $ediffi train --run-dir "$run_dir" --config "$config" --chains $chain --phases "$phase" --time-budget-s "$train_s" > "$run_dir/$phase.out" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
mkdir -p "$export_dir"
$ediffi train --run-dir "$run_dir" --config "$config" --export "$export_dir/default"
if [ "$baseline" != - ]; then
  $ediffi train --run-dir "$run_dir" --config "$config" --export "$export_dir/baseline_model" --baseline
fi
echo "continued in $(( $(date +%s) - start )) s: $export_dir"
