#!/usr/bin/env bash
# The records behind docs/TUNING.md's comparison of the shipped stage-2 defaults with the stability
# sweep's best point, per dataset: both stage 2 runs under the sweep's config on the seed-2020 stage 1
# the sweep loaded, each one's results, and the paired comparisons (default against best, stage 1
# against each on the stage 2's validation sample of users). Resumable like the other scripts.
#
#   OMP_NUM_THREADS=1 experiments/tuning_records.sh [ml1m|beauty]   (default ml1m)
#       records into docs/results/tuning-ml1m/ or docs/results/tuning-beauty/; Beauty needs
#       data/amazon-beauty with its text features (experiments/amazon.sh prepares them)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source experiments/common.sh
seed=2020
runs=()
records() {  # records PREFIX STAGE1 DEFAULT BEST BEST_NAME: results of both stage 2s and the three compares
  local prefix=$1 stage1=$2 default=$3 best=$4 best_name=$5
  results_record $D/$prefix-stage2-default $default
  results_record $D/$prefix-stage2-$best_name $best
  compare_record $D/compare-$prefix-stage2-default-best $default $best
  compare_record $D/compare-$prefix-stage1-stage2-default $stage1 $default --common-users
  compare_record $D/compare-$prefix-stage1-stage2-best $stage1 $best --common-users
}
case "${1:-ml1m}" in
  ml1m)
    D=docs/results/tuning-ml1m
    mkdir -p "$D"
    ml1m_sweep_runs
    default=runs/ml1m/seed2020/stage2_default
    stage_run yamls/ml1m/tune_stage2.yaml $default --set name=ml1m-stage2-default \
      --set "load=[{checkpoint: $ML1M_STAGE1/best.pt, groups: $BACKBONE}]"
    records ml1m $ML1M_STAGE1 $default $ML1M_STAGE2_BEST a22e3_00002
    ;;
  beauty)
    # the sweep's stage 1: Beauty's recipe before the converged one (yamls/amazon/stage1_earlier.yaml)
    D=docs/results/tuning-beauty
    mkdir -p "$D"
    dir=runs/amazon-beauty/seed2020
    stage_run yamls/amazon/stage1_earlier.yaml $dir/stage1_earlier --set name=amazon-beauty-stage1
    load="load=[{checkpoint: $dir/stage1_earlier/best.pt, groups: $BACKBONE}]"
    stage_run yamls/amazon/tune_stage2.yaml $dir/stage2_default --set name=amazon-beauty-stage2-default --set "$load"
    # the best trial of the Beauty sweep, 94bce_00001 (docs/tuning/amazon-beauty-trials.csv)
    stage_run yamls/amazon/tune_stage2.yaml $dir/stage2_94bce_00001 --set name=amazon-beauty-stage2-94bce_00001 \
      --set federated.server_lr=0.03908092587728687 --set model.projector_init_gain=0.7543058657601184 --set "$load"
    records beauty $dir/stage1_earlier $dir/stage2_default $dir/stage2_94bce_00001 94bce_00001
    ;;
  *) echo "usage: $0 [ml1m|beauty]" >&2; exit 2 ;;
esac
