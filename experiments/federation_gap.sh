#!/usr/bin/env bash
# The federation-gap study (docs/FEDERATION.md): federated stage 1 recipes on one dataset, each a
# stage run of yamls/<dataset>/stage1_earlier.yaml (the stage 1 the study started from) with its
# overrides, one seed. Resumable: a finished run is
# skipped, an interrupted one continues from its state.pt (run the same command again).
#
#   OMP_NUM_THREADS=1 experiments/federation_gap.sh amazon RECIPE [RECIPE ...]   (RECIPES below, or centralized)
#   SEED=2021 OUT=runs/gap ...                                                   other seed / folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source experiments/common.sh
dataset=$1; shift
seed=${SEED:-2020}
out=${OUT:-runs/gap}/$dataset/seed$seed

# Every recipe: full softmax, one unclipped local SGD step (the vectorized backend's pooled round),
# FedAdam, no early stop before the budget (patience 100), about 15 passes over the users.
COMMON=(--set loss.type=ce --set optim.clip_grad_norm=null --set eval.patience=100 --set state_every=10)
C256_COS="federated.clients_per_round=256 federated.rounds=1320 federated.server_lr=0.001 federated.schedule.kind=cosine federated.schedule.floor=0.05 eval.every=66"  # the shipped recipe; the axes below change one setting of it
declare -A RECIPES=(
  [c512-const]="federated.clients_per_round=512 federated.rounds=660 federated.server_lr=0.003 eval.every=33"
  [c512-cos]="federated.clients_per_round=512 federated.rounds=660 federated.server_lr=0.003 federated.schedule.kind=cosine federated.schedule.floor=0.05 eval.every=33"
  [c256-cos]="$C256_COS"
  [c256-cos-lr2]="federated.clients_per_round=256 federated.rounds=1320 federated.server_lr=0.002 federated.schedule.kind=cosine federated.schedule.floor=0.05 eval.every=66"
  [c1024-cos]="federated.clients_per_round=1024 federated.rounds=330 federated.server_lr=0.004 federated.schedule.kind=cosine federated.schedule.floor=0.05 eval.every=17"
  # tau at the scale of the updates (median |Delta| about 2e-6, 90th percentile 6e-5 to 1e-4),
  # Flower's beta2, several local steps
  [c256-cos-tau6]="$C256_COS federated.server_tau=1.0e-6"
  [c256-cos-tau5]="$C256_COS federated.server_tau=1.0e-5"
  [c256-cos-b99]="$C256_COS federated.server_beta2=0.99"
  [c256-cos-e2]="$C256_COS federated.local_epochs=2"
  [c256-cos-e3]="$C256_COS federated.local_epochs=3"
  [ml1m-c128-cos]="federated.clients_per_round=128 federated.rounds=472 federated.server_lr=0.002 federated.schedule.kind=cosine federated.schedule.floor=0.05 eval.every=24"
  # ML-1M users hold 3.7 windows each: 64 clients a round is the centralized batch of 256 windows,
  # 2,831 rounds are its 30 epochs (30 passes), 1,416 half of them
  [ml1m-c64-cos]="federated.clients_per_round=64 federated.rounds=2831 federated.server_lr=0.001 federated.schedule.kind=cosine federated.schedule.floor=0.05 eval.every=94"
  [ml1m-c64-cos15]="federated.clients_per_round=64 federated.rounds=1416 federated.server_lr=0.001 federated.schedule.kind=cosine federated.schedule.floor=0.05 eval.every=47"
  [c128-clip]="federated.clients_per_round=128 federated.rounds=500 eval.every=25 optim.clip_grad_norm=5.0"
)
for recipe in "$@"; do
  runs=()
  if [ "$recipe" = centralized ]; then  # the twin every recipe is held to (13 epochs: best epoch 11 on Beauty)
    stage_run "yamls/$dataset/stage1_centralized.yaml" "$out/centralized" --set loss.type=ce \
      --set centralized.epochs="${EPOCHS:-13}"
    continue
  fi
  [ -n "${RECIPES[$recipe]:-}" ] || { echo "unknown recipe $recipe (one of: ${!RECIPES[*]})" >&2; exit 2; }
  sets=(); for kv in ${RECIPES[$recipe]}; do sets+=(--set "$kv"); done
  stage_run "yamls/$dataset/stage1_earlier.yaml" "$out/$recipe" "${COMMON[@]}" "${sets[@]}"
done
