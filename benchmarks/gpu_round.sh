#!/usr/bin/env bash
# The GPU check: federated rounds of the sequential and vectorized backends, stages 1-3, 64 and 256
# clients (stage 3: 64), on ML-100K, on the first CUDA device. Needs this project's requirements with
# a CUDA build of torch; no Ray, no stock RecBole, no evaluation. 42 s on one H200 (docs/BENCHMARKS.md).
#
#   bash benchmarks/gpu_round.sh [OUT.json]        # default docs/benchmarks-gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/federated_round.py --quick --device cuda --backends sequential,vectorized \
    --skip-recbole --out "${1:-docs/benchmarks-gpu.json}"
