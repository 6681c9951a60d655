#!/usr/bin/env bash
# The records behind docs/PRIVACY.md's ML-1M measurements: the full-softmax stage 1 (seed 2020), what
# one of its uploads shows under each setting, a stage 2 of the stability sweep on it (trial
# a22e3_00002 of docs/TUNING.md) and what its projector upload shows, and popularity for scale.
# Needs data/ml-1m with its text and colour-histogram features (docs/DATA.md). Resumable: a finished
# run is skipped, an interrupted one continues (run the same command again).
#
#   OMP_NUM_THREADS=1 experiments/privacy_records.sh        records into docs/results/privacy/
#   DP_NOISE="1.5" ...                                       only these DP rows (default: 1.5 2.0 0.5)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source experiments/common.sh
D=docs/results/privacy
mkdir -p "$D"
runs=()
ml1m_sweep_runs
R=$ML1M_STAGE1 S=$ML1M_STAGE2_BEST
P=runs/ml1m/popularity
[ -f $P/summary.json ] || "$PY" run.py baseline --config yamls/ml1m/stage1_earlier.yaml --model Pop --set run_dir=$P --overwrite

"$PY" run.py results $R --out $D/ml1m-stage1-ce-seed2020.json > $D/ml1m-stage1-ce-seed2020.md
"$PY" run.py results $P --out $D/ml1m-popularity.json > $D/ml1m-popularity.md
for z in ${DP_NOISE:-1.5 2.0 0.5}; do  # the DP rows: the "none" run with user-level DP, about 50 min each
  seed=2020 stage_run yamls/ml1m/stage1_earlier.yaml runs/ml1m/seed2020/stage1_ce_dp$z --set loss.type=ce \
    --set name=ml1m-stage1-ce-dp$z --set "federated.dp={clip_norm: 1.0, noise_multiplier: $z, delta: null}"
  "$PY" run.py results runs/ml1m/seed2020/stage1_ce_dp$z --out $D/ml1m-stage1-ce-dp$z-seed2020.json \
    > $D/ml1m-stage1-ce-dp$z-seed2020.md
done
attack() {  # attack NAME RUN [--set ...]: one record, what the server learns from one upload under a setting
  local name=$1 run=$2; shift 2
  "$PY" run.py attack "$run" --clients 32 --json "$D/attack-$name.json" "$@"
}
attack ml1m-stage1-none $R
attack ml1m-stage1-secure $R --set federated.secure_aggregation=true
attack ml1m-stage1-sparse $R --set federated.sparse_uploads=true
attack ml1m-stage1-dp1.5 $R --set "federated.dp={clip_norm: 1.0, noise_multiplier: 1.5, delta: null}"
attack ml1m-stage2-plain $S
attack ml1m-stage2-secure $S --set federated.secure_aggregation=true
for table in ml1m-stage1 ml1m-stage2; do
  "$PY" run.py attack --records $D/attack-$table-*.json > $D/attack-$table.md
done
