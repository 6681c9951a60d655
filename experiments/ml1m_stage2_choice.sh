#!/usr/bin/env bash
# Does the stage-2 choice of docs/TUNING.md matter downstream? Per seed, on the full-softmax stage 1
# (`stage1_ce`, trained here if missing): stage 2 at the shipped defaults and at the ML-1M sweep's best
# point, stage 3 on each, `run.py compare` of the two stage 3s and of each against stage 1 (records
# into docs/results/ml1m-stage2-choice/), and, run over all three seeds, the results file. Rerunning
# skips finished runs and resumes interrupted ones. About 1 h of stage 1 and 40 min of stages 2-3 per
# seed on one core. Stage 1 is the recipe the page measured (yamls/ml1m/stage1_earlier.yaml), not
# today's stage1.yaml.
#
#   bash experiments/ml1m_stage2_choice.sh [SEEDS...]     # default: 2020 2021 2022
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(2020 2021 2022); fi
# the best trial of runs/tune/ml1m-tune-stage2-20261130-211111 (docs/TUNING.md), rounded
BEST=(--set federated.server_lr=0.001 --set model.projector_init_gain=3.36)

source experiments/common.sh
D=docs/results/ml1m-stage2-choice
mkdir -p "$D"
runs=()
for seed in "${SEEDS[@]}"; do
  dir="runs/ml1m/seed$seed"
  stage() {  # stage N NAME [--set ...]: one run of yamls/ml1m/stageN.yaml for this seed
    local n="$1" name="$2"; shift 2
    stage_run "yamls/ml1m/stage$n.yaml" "$dir/$name" --set name="ml1m-${name//_/-}" "$@"
  }
  stage 1_earlier stage1_ce --set loss.type=ce
  s2_load="load=[{checkpoint: $dir/stage1_ce/best.pt, groups: $BACKBONE}]"
  stage 2 stage2_ce --set "$s2_load"
  stage 2 stage2_ce_tuned --set "$s2_load" "${BEST[@]}"
  for s2 in stage2_ce stage2_ce_tuned; do
    stage 3 "${s2/stage2/stage3}" --set "load=[{checkpoint: $dir/stage1_ce/best.pt, groups: $BACKBONE}, \
{checkpoint: $dir/$s2/best.pt, groups: [visual_proj, text_proj, align_gating]}]"
  done
  pair() { compare_record "$D/compare-$1-$2-seed$seed" "$dir/$1" "$dir/$2"; }  # pair RUN_A RUN_B
  pair stage3_ce stage3_ce_tuned
  pair stage1_ce stage3_ce
  pair stage1_ce stage3_ce_tuned
done
# the results file holds every seed's runs: written only by a run over all three
[ $# -gt 0 ] || "$PY" run.py results "${runs[@]}" --out docs/results/ml-1m-stage2-choice.json
