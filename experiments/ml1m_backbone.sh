#!/usr/bin/env bash
# docs/RESULTS-ML1M.md's section on the converged federated backbone: for each seed, the stage 2 and
# stage 3 of yamls/ml1m/ on the `ml1m-c64-cos` stage 1 of docs/FEDERATION.md (the settings of today's
# yamls/ml1m/stage1.yaml), each paired with that stage 1 (test, all users, targets sliced at 10
# training interactions, 10,000 resamples), and the results of the three; records into
# docs/results/ml1m-backbone/. Needs data/ml-1m with its text and colour-histogram features
# (docs/DATA.md). Resumable: a finished run is skipped, an interrupted one continues.
#
#   OMP_NUM_THREADS=1 experiments/ml1m_backbone.sh [SEED ...]   (default 2022; GAP=runs/gap/ml1m holds
#                                                                the stage 1s of experiments/federation_gap.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source experiments/common.sh
GAP=${GAP:-runs/gap/ml1m}
D=docs/results/ml1m-backbone
mkdir -p "$D"
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(2022); fi
for seed in "${SEEDS[@]}"; do
  s1=$GAP/seed$seed/ml1m-c64-cos
  [ -f "$s1/summary.json" ] || OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} SEED=$seed experiments/federation_gap.sh ml1m ml1m-c64-cos
  dir=runs/ml1m-backbone/seed$seed
  runs=("$s1")
  stage_run yamls/ml1m/stage2.yaml "$dir/stage2" --set "load=[{checkpoint: $s1/best.pt, groups: $BACKBONE}]"
  stage_run yamls/ml1m/stage3.yaml "$dir/stage3" --set "load=[{checkpoint: $s1/best.pt, groups: $BACKBONE}, {checkpoint: $dir/stage2/best.pt, groups: [visual_proj, text_proj, align_gating]}]"
  for stage in stage2 stage3; do
    compare_record "$D/compare-stage1-$stage-seed$seed" "$s1" "$dir/$stage" --common-users --item-count-bins 10
  done
  results_record "$D/runs-seed$seed" "${runs[@]}"
done
