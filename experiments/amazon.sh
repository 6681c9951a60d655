#!/usr/bin/env bash
# The Amazon rows of docs/RESULTS-BEAUTY.md: data and MiniLM text features, then per seed the federated stage 1,
# the item-content stage 1 (content trained with the IDs from round 1) and a stage 3 on it, the chain
# with and without the item-content option (stage 1 -> 2 -> 3), the stage-3 memory-off ablation, this
# project's stage 1 trained centrally, stock RecBole SASRec on the same split, `run.py compare` of each
# against stage 1 (targets sliced at 10 training interactions, as the goal is; stage 3 scores a user
# sample, so on its users), `run.py ablate` of each stage 3, and the results file. Rerunning skips
# finished runs and resumes interrupted ones.
#
#   bash experiments/amazon.sh [CATEGORY] [SEEDS...]     # defaults: Beauty, 2020 2021 2022
#
# SHARED (default ../shared/data/amazon-5core) holds <CATEGORY>_user_sequence.txt.gz and _item_text.txt.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CATEGORY="${1:-Beauty}"
shift || true
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(2020 2021 2022); fi
SHARED="${SHARED:-../shared/data/amazon-5core}"
NAME="amazon-${CATEGORY,,}"
SASREC_EPOCHS="${SASREC_EPOCHS:-20}"

[ -f "data/$NAME/$NAME.inter" ] || "$PY" run.py prepare amazon --out data \
    --sequences "$SHARED/${CATEGORY}_user_sequence.txt.gz" --item-text "$SHARED/${CATEGORY}_item_text.txt.gz"
[ -f "data/$NAME/text_minilm.npz" ] || "$PY" run.py prepare text --dataset-dir "data/$NAME" \
    --out "data/$NAME/text_minilm.npz"

source experiments/common.sh
runs=()
for seed in "${SEEDS[@]}"; do
  dir="runs/$NAME/seed$seed"
  stage() {  # stage FILE NAME [--set ...]: one run of yamls/amazon/FILE.yaml for this seed
    local file="$1" name="$2"; shift 2
    local text=(); [[ "$file" == stage1 || "$file" == stage1_centralized ]] || \
        text=(--set data.text_features="data/$NAME/text_minilm.npz")
    stage_run "yamls/amazon/$file.yaml" "$dir/$name" --set data.dataset="$NAME" "${text[@]}" "$@"
  }
  stage stage1 stage1
  # the rows that decide the goal first, so that a run cut short has them
  stage stage1_content stage1_content
  stage stage3_content stage3_on_stage1_content --set name="$NAME-stage3-on-stage1-content" \
      --set "load=[{checkpoint: $dir/stage1_content/best.pt, groups: ${BACKBONE%]}, text_proj]}]"
  for variant in "" _content; do
    stage "stage2$variant" "stage2$variant" --set "load=[{checkpoint: $dir/stage1/best.pt, groups: $BACKBONE}]"
    s3_load="load=[{checkpoint: $dir/stage1/best.pt, groups: $BACKBONE}, {checkpoint: $dir/stage2$variant/best.pt, groups: [visual_proj, text_proj, align_gating]}]"
    stage "stage3$variant" "stage3$variant" --set "$s3_load"
  done
  stage stage3_content stage3_content_no_memory --set "$s3_load" --set model.memory.st_k=0 --set model.memory.lt_k=0
  stage stage1_centralized stage1_centralized
  run="$dir/baseline-SASRec"
  baseline_done "$run" "$SASREC_EPOCHS" || "$PY" run.py baseline --config yamls/amazon/stage1.yaml --model SASRec \
      --epochs "$SASREC_EPOCHS" --quiet --set seed="$seed" --set data.dataset="$NAME" --set run_dir="$run" \
      $(resume "$run")
  runs+=("$run")
  # --common-users: a stage 3 scores a user sample; for two runs that scored everyone it changes nothing
  for other in stage2 stage2_content stage1_content stage1_centralized \
      stage3 stage3_content stage3_content_no_memory stage3_on_stage1_content; do
    "$PY" run.py compare "$dir/stage1" "$dir/$other" --common-users --item-count-bins 10 \
        --json "$dir/compare-stage1-$other.json"
  done
  for s3 in stage3 stage3_content stage3_on_stage1_content; do
    "$PY" run.py ablate "$dir/$s3" --json "$dir/ablate-$s3.json"
  done
done
mkdir -p docs/results
"$PY" run.py results "${runs[@]}" --out "docs/results/$NAME.json"
