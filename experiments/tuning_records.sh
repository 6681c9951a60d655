#!/usr/bin/env bash
# The records behind docs/TUNING.md's ML-1M comparison of the shipped stage-2 defaults with the
# stability sweep's best point: both stage 2 runs under the sweep's config on the seed-2020
# full-softmax stage 1, each one's results, and the paired comparisons (default against best, stage 1
# against each on the stage 2's validation sample of users). Resumable like the other scripts.
#
#   OMP_NUM_THREADS=1 experiments/tuning_records.sh        records into docs/results/tuning-ml1m/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source experiments/common.sh
seed=2020
D=docs/results/tuning-ml1m
mkdir -p "$D"
runs=()
ml1m_sweep_runs
default=runs/ml1m/seed2020/stage2_default
stage_run yamls/ml1m/tune_stage2.yaml $default --set name=ml1m-stage2-default \
  --set "load=[{checkpoint: $ML1M_STAGE1/best.pt, groups: $BACKBONE}]"
"$PY" run.py results $default --out $D/ml1m-stage2-default.json > $D/ml1m-stage2-default.md
"$PY" run.py results $ML1M_STAGE2_BEST --out $D/ml1m-stage2-a22e3_00002.json > $D/ml1m-stage2-a22e3_00002.md
compare() {  # compare NAME RUN_A RUN_B [ARGS...]: the paired comparison's record and table
  local name=$1; shift
  "$PY" run.py compare "$@" --json $D/compare-$name.json > $D/compare-$name.md
}
compare ml1m-stage2-default-best $default $ML1M_STAGE2_BEST
compare ml1m-stage1-stage2-default $ML1M_STAGE1 $default --common-users
compare ml1m-stage1-stage2-best $ML1M_STAGE1 $ML1M_STAGE2_BEST --common-users
