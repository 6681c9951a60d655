#!/usr/bin/env bash
# The records and tables of docs/RESULTS-BEAUTY.md's section on the converged federated backbone (the
# c256-cos stage 1 of docs/FEDERATION.md, now yamls/amazon/stage1.yaml's default): for each seed under
# OUT, the results of its finished runs of experiments/amazon.sh (stage 1, the item-content stage 1,
# the text route stage 2 -> stage 3 and the stage 3 on the item-content stage 1, and that stage 3
# scored on all users where its copy `stage3_on_stage1_content_all_users` exists: RESULTS-BEAUTY.md's
# Reproduce says how) and each paired with stage 1 (`run.py compare --common-users`: a stage 3 scores
# a 3,000-user sample; targets sliced at 10 training interactions; 10,000 resamples); the all-users
# stage 3 also with the item-content stage 1 it starts from.
#   experiments/beauty_backbone_report.sh [SEED ...]   (OUT=runs/amazon-beauty; writes docs/results/amazon-beauty-backbone/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source experiments/common.sh
OUT=${OUT:-runs/amazon-beauty}
D=docs/results/amazon-beauty-backbone
mkdir -p "$D"
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(2020 2021 2022); fi
for seed in "${SEEDS[@]}"; do
  dir=$OUT/seed$seed
  [ -f "$dir/stage1/summary.json" ] || continue
  runs=("$dir/stage1")
  for other in stage1_content stage2_content stage3_content stage3_on_stage1_content \
      stage3_on_stage1_content_all_users; do
    [ -f "$dir/$other/summary.json" ] || continue
    runs+=("$dir/$other")
    compare_record "$D/compare-stage1-$other-seed$seed" "$dir/stage1" "$dir/$other" --common-users --item-count-bins 10
  done
  all=$dir/stage3_on_stage1_content_all_users
  [ ! -f "$all/summary.json" ] || compare_record "$D/compare-stage1_content-stage3_on_stage1_content_all_users-seed$seed" \
      "$dir/stage1_content" "$all" --item-count-bins 10
  results_record "$D/runs-seed$seed" "${runs[@]}"
done
