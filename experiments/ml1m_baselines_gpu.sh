#!/usr/bin/env bash
# The stock RecBole baselines of docs/RESULTS-ML1M.md (SASRec and GRU4Rec, centralized, on the stage-1
# split and evaluation) on one CUDA GPU: every (model, seed) at once, each trained for up
# to EPOCHS epochs with the patience of this project's centralized stage 1 (10 validations), and each
# cut at MINUTES of training (the summary then says stopped_by "time"; rerunning resumes it). Needs
# data/ml-1m/ml-1m.inter (experiments/ml1m.sh prepares it). One log per run beside its folder.
# DEVICE (default cuda) picks the GPU, e.g. DEVICE=cuda:1.
#
#   bash experiments/ml1m_baselines_gpu.sh [SEEDS...]     # defaults: 2020 2021 2022
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
EPOCHS="${EPOCHS:-30}"
MINUTES="${MINUTES:-60}"
source experiments/common.sh
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(2020 2021 2022); fi

pids=()
for seed in "${SEEDS[@]}"; do
  for model in SASRec GRU4Rec; do
    run="runs/ml1m/seed$seed/baseline-$model-gpu"
    baseline_done "$run" "$EPOCHS" && continue
    resume=(--overwrite); [ -f "$run/state.pt" ] && resume=(--resume "$run")
    mkdir -p "$(dirname "$run")"
    "$PY" run.py baseline --config yamls/ml1m/stage1_earlier.yaml --model "$model" --epochs "$EPOCHS" \
        --max-minutes "$MINUTES" --quiet --set device="${DEVICE:-cuda}" --set seed="$seed" --set eval.patience=10 \
        --set "name=baseline-${model,,}-gpu" --set run_dir="$run" "${resume[@]}" > "$run.log" 2>&1 &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
