#!/usr/bin/env bash
# One prepared GPU check (about 5 minutes of device time): throughput on the GPU with bf16, GPU
# utilisation while training, and a 1-worker Ray Train epoch. Installs nothing beyond the device
# image; run from the repository root with the shared Beauty log beside it (../shared) or with
# DATA=/path/to/prepared-or-raw-log. Figures go to stdout and to $OUT (if set).
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
DATA="${DATA:-../shared/datasets/beauty/interactions.parquet}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"

# utilisation sampled every 200 ms while the benchmark runs
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/util.csv" &
SMI=$!
timeout 240 $PY benchmarks/throughput.py --data "$DATA" --device cuda --threads 8 --batches 400 \
    --eval-users 8192 --set batch_size=4096 --set eval_batch_size=4096 | tee "$OUT/throughput_bs4096.json"
timeout 120 $PY benchmarks/throughput.py --data "$DATA" --device cuda --threads 8 --batches 400 \
    --eval-users 8192 | tee "$OUT/throughput_bs512.json"
kill $SMI 2>/dev/null
awk -F, '$1 > 0 {s += $1; n++} END {if (n) printf "gpu utilisation while busy: mean %.1f%% over %d samples\n", s / n, n}' "$OUT/util.csv" | tee "$OUT/util_summary.txt"

# one epoch of Ray Train on one GPU worker (bf16 autocast is the default on CUDA)
$PY -m diffurec split --data "$DATA" --out "$OUT/beauty" >/dev/null 2>&1 || true
RAY_AUTH_MODE=disabled timeout 240 $PY pipelines/train.py --data "$OUT/beauty" --num-workers 1 --use-gpu \
    --set epochs=1 --set batch_size=4096 --mlflow-uri "sqlite:///$OUT/mlflow.db" 2>"$OUT/train.err" | tail -1 | tee "$OUT/ray_train.json"
