#!/usr/bin/env bash
# The GPU check (docs/BENCHMARKS.md, "On a GPU"): at most 8 minutes on one GPU, in three parts that
# each write their results as they finish, so a check cut short keeps what it measured:
#   A. federated rounds of stages 1-3, sequential and vectorized, 64 and 256 ML-100K clients, against
#      the same windows as one centralized batch, and validation, all on the GPU (federated_round.py);
#   B. 20 rounds of ML-100K stage 1 (full softmax, dropout off) on the GPU and on the CPU, whose
#      validation metrics must agree to 1e-3;
#   C. ML-1M stage 1 (yamls/ml1m/stage1_earlier.yaml: 600 rounds, validation every 10) on the GPU, end to
#      end, cut at 5 minutes (or what the 8 are left): seconds per round and per validation, and the
#      projection to its 600 rounds.
# B and C set federated.cohort_size=null (cohorts sized to the GPU's memory; 64 on a CPU), as A does.
# After each part, OUT (default docs/benchmarks-gpu.json) is rewritten from the parts so far
# (benchmarks/gpu_report.py merge: the earlier numbers stay in it, under `earlier`).
#
#   bash benchmarks/gpu_round.sh [OUT.json]
#   DEVICE=cpu TINY=1 bash benchmarks/gpu_round.sh /tmp/smoke.json   # every step, tiny, on a CPU
#
# Needs data/ml-100k, a prepared data/ml-1m (ml-1m.inter and ml-1m.item; stage 1 reads no features)
# and this project's requirements with a CUDA build of torch (docs/DEVICES.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
OUT="${1:-docs/benchmarks-gpu.json}"
# Seconds for the three parts; the start and the merges fit in the rest of 8 minutes (a smoke: no limit).
BUDGET="${BUDGET:-$([ -n "${TINY:-}" ] && echo 3600 || echo 470)}"
PARTS="$(mktemp -d -t gpu-check-XXXXXX)"
echo "parts in $PARTS"
if [ "$DEVICE" != cpu ]; then
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")' || exit 2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

if [ -n "${TINY:-}" ]; then  # the same steps on a tiny model and 60 users: a smoke test of the script
  DATA="$PARTS/data"
  ROUND_ARGS=(--quick --stages 1 --backends vectorized --data "$DATA")
  SETS=(--set "data.path=$DATA" --set data.max_users=60 --set model.hidden_size=32 --set model.n_layers=1
        --set model.inner_size=64)
  ROUNDS=2 EVERY=1 ML1M_EVERY=2 ML1M_SETS=(--set data.dataset=ml-100k --set eval.every=2)
  LIMIT_A=600 LIMIT_B=300 LIMIT_C=60 TINY_JSON=true
else
  ROUND_ARGS=(--stages 1,2,3 --backends sequential,vectorized --datasets ml-100k)
  SETS=() ROUNDS=20 EVERY=10 ML1M_EVERY=10 ML1M_SETS=() LIMIT_A=150 LIMIT_B=60 LIMIT_C=300 TINY_JSON=false
fi

status=()
merge() {
  printf '{"device": "%s", "tiny": %s, "seconds": %d, "exit_codes": {%s}}\n' "$DEVICE" "$TINY_JSON" \
    "$SECONDS" "$(IFS=,; echo "${status[*]}")" > "$PARTS/check.json"
  "$PYTHON" benchmarks/gpu_report.py merge "$PARTS" --into "$OUT"
}
left() { local rest=$((BUDGET - SECONDS)); echo $(( rest < $1 ? (rest > 10 ? rest : 10) : $1 )); }

echo "== A: rounds, stages 1-3, on $DEVICE"
PYTHONUNBUFFERED=1 timeout "$(left $LIMIT_A)" "$PYTHON" benchmarks/federated_round.py --device "$DEVICE" \
  --skip-recbole "${ROUND_ARGS[@]}" --out "$PARTS/rounds.json"
status+=("\"rounds\": $?"); merge

echo "== B: $ROUNDS rounds of ML-100K stage 1 on $DEVICE and on the CPU"
for side in device cpu; do  # "device" is $DEVICE (the smoke runs both sides on the CPU)
  where=$([ $side = cpu ] && echo cpu || echo "$DEVICE")
  timeout "$(left $LIMIT_B)" "$PYTHON" run.py --config yamls/demo/stage1.yaml --quiet "${SETS[@]}" \
    --set "device=$where" --set "run_dir=$PARTS/b-$side" --set "federated.rounds=$ROUNDS" \
    --set "eval.every=$EVERY" --set loss.type=ce --set model.hidden_dropout_prob=0.0 \
    --set model.attn_dropout_prob=0.0 --set state_every=0 --set federated.cohort_size=null > "$PARTS/b-$side.log" 2>&1
  status+=("\"run_$side\": $?")
done
"$PYTHON" benchmarks/gpu_report.py compare "$PARTS/b-cpu" "$PARTS/b-device" --tolerance 1e-3 \
  --out "$PARTS/cpu_vs_gpu.json"
status+=("\"cpu_vs_gpu_agree\": $?"); merge

echo "== C: ML-1M stage 1 on $DEVICE, cut at $(left $LIMIT_C) s"
start=$SECONDS
timeout "$(left $LIMIT_C)" "$PYTHON" run.py --config yamls/ml1m/stage1_earlier.yaml --quiet "${SETS[@]}" "${ML1M_SETS[@]}" \
  --set "device=$DEVICE" --set "run_dir=$PARTS/ml1m" --set federated.cohort_size=null > "$PARTS/ml1m.log" 2>&1
status+=("\"ml1m\": $?")  # 124: cut by the time limit (its state is saved every round: --resume goes on)
"$PYTHON" benchmarks/gpu_report.py timing "$PARTS/ml1m" --wall $((SECONDS - start)) --planned-rounds 600 \
  --every "$ML1M_EVERY" --out "$PARTS/ml1m_stage1.json"
merge
echo "wrote $OUT in ${SECONDS} s (parts, logs and run folders in $PARTS)"
