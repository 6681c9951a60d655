#!/usr/bin/env bash
# Every row of docs/RESULTS-ML1M.md: ML-1M data and features, federated stages 1-3 and the stage-3
# ablations for each seed, this project's stage 1 trained centrally, stock RecBole baselines, and
# the results file. Hours on 2 CPU cores (docs/RESULTS-ML1M.md gives each row's time). Rerunning the script
# skips finished runs and resumes interrupted ones (and baselines stopped by their time limit), so the
# table can be filled session by session.
#
#   bash experiments/ml1m.sh [SHARED_ML1M_DIR] [SEEDS...]     # defaults: ../shared/data/ml-1m, 2020 2021 2022
#
# Stock baselines: on a machine with a CUDA GPU, experiments/ml1m_baselines_gpu.sh (up to 30 epochs
# each); without one, 3 epochs each on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
SHARED="${1:-../shared/data/ml-1m}"
shift || true
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(2020 2021 2022); fi
POSTERS="${POSTERS:-$(dirname "$SHARED")/ml-1m-posters/ml1m_posters_96x144.tar}"

[ -f data/ml-1m/ml-1m.inter ] || "$PY" run.py prepare ml1m --shared "$SHARED" --out data
[ -f data/ml-1m/text_minilm.npz ] || "$PY" run.py prepare text --dataset-dir data/ml-1m --out data/ml-1m/text_minilm.npz
[ -f data/ml-1m/image_color_histogram.npz ] || "$PY" run.py prepare images --encoder color_histogram \
    --images "$POSTERS" --dataset-dir data/ml-1m --out data/ml-1m/image_color_histogram.npz

source experiments/common.sh
BASELINE_EPOCHS=3
GPU=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")')
runs=()
for seed in "${SEEDS[@]}"; do
  dir="runs/ml1m/seed$seed"
  stage() {  # stage N NAME [--set ...]: one run of yamls/ml1m/stageN.yaml for this seed
    local n="$1" name="$2"; shift 2
    stage_run "yamls/ml1m/stage$n.yaml" "$dir/$name" "$@"
  }
  # the page's stage 1 is the recipe before docs/FEDERATION.md's became stage1.yaml
  stage 1_earlier stage1
  stage 1_earlier stage1_ce --set loss.type=ce --set name=ml1m-stage1-ce  # the full softmax instead of sampled negatives
  stage 2 stage2 --set "load=[{checkpoint: $dir/stage1/best.pt, groups: $BACKBONE}]"
  s3_load="load=[{checkpoint: $dir/stage1/best.pt, groups: $BACKBONE}, {checkpoint: $dir/stage2/best.pt, groups: [visual_proj, text_proj, align_gating]}]"
  stage 3 stage3 --set "$s3_load"
  stage 3 stage3_text_only --set "$s3_load" --set data.image_features=null
  stage 3 stage3_image_only --set "$s3_load" --set data.text_features=null
  stage 3 stage3_no_memory --set "$s3_load" --set model.memory.st_k=0 --set model.memory.lt_k=0
  [ -f "$dir/stage1_centralized/summary.json" ] || "$PY" run.py --config yamls/ml1m/stage1_centralized.yaml \
      --quiet --set seed="$seed" --set run_dir="$dir/stage1_centralized" $(resume "$dir/stage1_centralized")
  runs+=("$dir/stage1_centralized")
  for model in SASRec GRU4Rec; do  # without a GPU: 3 epochs, as a SASRec epoch is ~2 h on one core
    [ "$GPU" = yes ] && break
    run="$dir/baseline-$model"
    # done once it ran its epochs (or stopped on patience); a time-limited one goes on next session
    baseline_done "$run" "$BASELINE_EPOCHS" || \
      "$PY" run.py baseline --config yamls/ml1m/stage1_earlier.yaml --model "$model" --epochs "$BASELINE_EPOCHS" \
        --max-minutes 150 --quiet --set seed="$seed" --set run_dir="$run" $(resume "$run")
    runs+=("$run")
  done
done
if [ "$GPU" = yes ]; then
  PYTHON="$PY" bash experiments/ml1m_baselines_gpu.sh "${SEEDS[@]}"
  for seed in "${SEEDS[@]}"; do runs+=("runs/ml1m/seed$seed/baseline-SASRec-gpu" "runs/ml1m/seed$seed/baseline-GRU4Rec-gpu"); done
fi
mkdir -p docs/results
"$PY" run.py results "${runs[@]}" --out docs/results/ml-1m.json --plots docs/results/
