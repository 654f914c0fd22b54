#!/usr/bin/env bash
# One prepared GPU check (about 4 minutes of device time for steps 0-3, start-up aside: 234 s on an
# H100). Run from the repository root:
#   m. ML-1M trained to the end of configs/ml1m_protocol.yaml (cosine over 6 epochs, validation every
#      epoch, the best epoch tested): the paper's second benchmark, out of reach of a 2-core CPU.
#      Opt-in (STEPS="m", then the other steps in a second call on the warm machine). Tracked in an
#      MLflow file store that comes back as $OUT/ml1m_mlruns.tgz, ready for
#      `python pipelines/runs.py export --mlflow-uri file://DIR/mlruns --experiment ml-1m`;
#   0. the GPU-only test: CUDA-graph steps against eager steps (tests/test_cuda_graphs.py);
#   1. gpu_profile.py: training samples/s, NVML utilisation and profiler kernel time at batch
#      sizes 512..8192 (bf16 autocast, the default on CUDA), with CUDA graphs (the default) and,
#      in the same run, without them (cuda_graphs=false, the baseline);
#   2. throughput.py at the reference hyper-parameters (batch 512): the baseline (eager steps,
#      the CPU's token-budget evaluation batches), then the defaults (CUDA graphs, fixed 4096-user
#      evaluation batches on a GPU), then at batch 4096;
#   3. a 1-worker Ray Train run of pipelines/train.py on the GPU (2 epochs, CUDA graphs), GPU utilisation
#      sampled by nvidia-smi meanwhile.
# Installs nothing. Ray and MLflow are not in a bare GPU image: if WHEELS (default .gpu/whl)
# holds their wheels they are unpacked into /tmp/site for step 3 (MLflow's file store then
# tracks the run: no SQLAlchemy needed); without them step 3 is skipped and says so.
# DATA: a prepared dataset or raw log (default ../shared's Beauty); ML1M_DATA likewise for step m
# (default .gpu/ml-1m, which gpu_wheels.sh prepares), ML1M_SETS extra `--set`s for it (a dry run:
# ML1M_SETS="--set epochs=1"). DEVICE=cpu dry-runs the
# script on a machine without a GPU. Figures go to stdout and to $OUT (at most 8 files).
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
DATA="${DATA:-../shared/datasets/beauty/interactions.parquet}"
DEVICE="${DEVICE:-cuda}"
WHEELS="${WHEELS:-.gpu/whl}"
SECONDS_PER_SIZE="${SECONDS_PER_SIZE:-6}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-0 1 2 3}"  # which of the steps below to run, e.g. STEPS=3 for the Ray run alone
want() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1

if [ -d "$WHEELS" ]; then  # unpack while the GPU steps run
    ( $PY - "$WHEELS" /tmp/site <<'EOF'
import glob, os, stat, sys, zipfile
src, site = sys.argv[1], sys.argv[2]
for wheel in sorted(glob.glob(os.path.join(src, "*"))):
    zipfile.ZipFile(wheel).extractall(site)
for binary in ("ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server"):
    path = os.path.join(site, binary)
    if os.path.exists(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
EOF
    ) > "$OUT/unpack.log" 2>&1 &
    UNPACK=$!
fi

echo "== machine"
{
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    fi
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$OUT/machine.txt"

unpacked() {  # Ray and MLflow from $WHEELS importable, once the unpacking has finished
    if [ -n "${UNPACK:-}" ]; then
        wait "$UNPACK" 2>/dev/null || { echo "unpacking $WHEELS failed:"; tail -5 "$OUT/unpack.log"; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        UNPACK=""
    fi
    $PY -c "import ray, mlflow" > "$OUT/import.txt" 2>&1
}

if want m; then
    ML1M_DATA="${ML1M_DATA:-.gpu/ml-1m}"
    echo "== m. ML-1M, configs/ml1m_protocol.yaml, seed ${ML1M_SEED:-42}, from $ML1M_DATA"
    RUN_M=/tmp/gpu_check_ml1m; rm -rf "$RUN_M"; mkdir -p "$RUN_M"
    TRACK=(--no-mlflow)
    if unpacked; then TRACK=(--mlflow-uri "file://$RUN_M/mlruns" --experiment ml-1m); else
        echo "MLflow not importable: the run is not tracked; its metrics come back as ml1m_metrics.jsonl"; fi
    began=$(date +%s)
    # shellcheck disable=SC2086  # ML1M_SETS is a list of --set words
    MLFLOW_ALLOW_FILE_STORE=true timeout "${ML1M_TIMEOUT:-540}" $PY -m diffurec train --data "$ML1M_DATA" \
        --config configs/ml1m_protocol.yaml --set device="$DEVICE" --set seed="${ML1M_SEED:-42}" \
        --set output_dir="$RUN_M" ${ML1M_SETS:-} --name "ml1m-gpu-s${ML1M_SEED:-42}" "${TRACK[@]}" \
        --no-progress > "$OUT/ml1m.json" 2> "$RUN_M/train.err"
    echo "exit $? after $(( $(date +%s) - began )) s"
    cat "$OUT/ml1m.json"; grep -E "Error|error" "$RUN_M/train.err" | tail -5
    cp "$RUN_M"/runs/*/metrics.jsonl "$OUT/ml1m_metrics.jsonl" 2>/dev/null
    [ -d "$RUN_M/mlruns" ] && tar czf "$OUT/ml1m_mlruns.tgz" -C "$RUN_M" mlruns
fi

if [ "$DEVICE" = cuda ] && want 0; then
    echo "== 0. GPU test"
    timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py > "$OUT/gpu_test.txt" 2>&1
    tail -15 "$OUT/gpu_test.txt"
fi

if want 1; then
    echo "== 1. training by batch size (gpu_profile.py), CUDA graphs on, then off"
    timeout 200 $PY benchmarks/gpu_profile.py --data "$DATA" --device "$DEVICE" --set cuda_graphs=true \
        --batch-sizes "${BATCH_SIZES:-512,2048,8192}" --seconds "$SECONDS_PER_SIZE" | tee "$OUT/profile.jsonl"
    timeout 120 $PY benchmarks/gpu_profile.py --data "$DATA" --device "$DEVICE" --set cuda_graphs=false \
        --batch-sizes "${EAGER_BATCH_SIZES:-512,8192}" --seconds "$SECONDS_PER_SIZE" | tee -a "$OUT/profile.jsonl"
fi

if want 2; then
    echo "== 2a. throughput.py, reference hyper-parameters (batch 512): the baseline, eager steps and the CPU's evaluation batches"
    timeout 150 $PY benchmarks/throughput.py --data "$DATA" --device "$DEVICE" --threads 8 \
        --batches "${BATCHES:-200}" --eval-users 8192 --set cuda_graphs=false \
        --set eval_batch_size=2048 --set eval_batch_tokens=6144 | tee "$OUT/throughput.jsonl"
    echo "== 2b. throughput.py, batch 512, the defaults (CUDA graphs, 4096-user evaluation batches)"
    timeout 150 $PY benchmarks/throughput.py --data "$DATA" --device "$DEVICE" --threads 8 \
        --batches "${BATCHES:-200}" --eval-users 8192 | tee -a "$OUT/throughput.jsonl"
    echo "== 2c. throughput.py, batch 4096"
    timeout 150 $PY benchmarks/throughput.py --data "$DATA" --device "$DEVICE" --threads 8 \
        --batches "${BATCHES:-200}" --eval-users 8192 --set batch_size=4096 | tee -a "$OUT/throughput.jsonl"
fi

if ! want 3; then exit 0; fi
echo "== 3. Ray Train, 1 worker, 2 epochs, cuda_graphs=${RAY_CUDA_GRAPHS:-true}"
if ! unpacked; then
    echo "skipped: ray and mlflow are not importable (wheels in $WHEELS: $(ls "$WHEELS" 2>/dev/null | wc -l)):"
    tail -5 "$OUT/import.txt"
    exit 0
fi
RUN=/tmp/gpu_check_ray; rm -rf "$RUN"; mkdir -p "$RUN"
GPU_FLAG=(); [ "$DEVICE" = cuda ] && GPU_FLAG=(--use-gpu)
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 100 > "$RUN/util.csv" &
    SMI=$!
fi
began=$(date +%s)
# a throwaway single-machine cluster: token auth off; MLflow's file store (no SQLAlchemy here)
RAY_AUTH_MODE=disabled MLFLOW_ALLOW_FILE_STORE=true timeout 300 $PY pipelines/train.py --data "$DATA" \
    --num-workers 1 "${GPU_FLAG[@]}" --set epochs="${RAY_EPOCHS:-2}" --set output_dir="$RUN" \
    --set cuda_graphs="${RAY_CUDA_GRAPHS:-true}" \
    --storage-path "$RUN/ray" --mlflow-uri "file://$RUN/mlruns" --no-log-model \
    > "$OUT/ray_train.json" 2> "$RUN/train.err"
status=$?
echo "exit $status after $(( $(date +%s) - began )) s"
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
cat "$OUT/ray_train.json"
[ "$status" -ne 0 ] && grep -E "Error|error" "$RUN/train.err" | tail -20 | tee "$OUT/ray_train_err.txt"
if [ -s "$RUN/util.csv" ]; then
    # the busy stretch: from the first sample above 10% to the last
    awk '{u[NR] = $1} END {for (i = 1; i <= NR; i++) if (u[i] > 10) {if (!a) a = i; b = i}
         for (i = a; i <= b; i++) s += u[i]; if (b) printf "ray run: %d util samples; busy stretch %d samples (%.1f s), mean %.1f%%\n", NR, b - a + 1, (b - a + 1) / 10, s / (b - a + 1)}' \
        "$RUN/util.csv" | tee "$OUT/ray_util.txt"
fi
echo "train samples/s by epoch (MLflow: timestamp value step):"
find "$RUN/mlruns" -path "*metrics*" -name "samples_per_s" -path "*train*" -exec cat {} \; 2>/dev/null
