#!/usr/bin/env bash
# Reproduce docs/results.md on Beauty: the headline DiffuRec config (the reference block under the
# fast protocol, configs/fast_protocol.yaml) over seeds, this project's block as its ablation,
# SASRec-CE under the same protocol, the headline with label smoothing 0.2 over seeds; then export
# the runs into results/runs/ and regenerate the pages. Every run is an MLflow run in
# outputs/mlflow.db.
# Long: on a 2-core Intel Xeon VM (AMX) bf16 epochs took 29-33 s alone at 2 threads, and two
# 40-epoch runs side by side at 1 thread each (LANES=2) took 40-60 minutes. Runs are resumable: a cut-off run
# continues from its last epoch (`--resume NAME`), a finished one is skipped.
#   SEEDS="42 43 44" LANES=2 [FP32=1] bash benchmarks/reproduce_beauty.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-42 43 44}"
LANES="${LANES:-1}"
DATA=outputs/data/beauty
THREADS=$(( $(nproc) / LANES )); [ "$THREADS" -ge 1 ] || THREADS=1
COMMON=(--data "$DATA" --experiment beauty --no-progress --config configs/fast_protocol.yaml
        --set precision=bf16 --set threads="$THREADS")
# the block this project used before the reference's became the default (README, "Configuration")
PROJECT_BLOCK=(--set gelu=exact --set dropout_placement=residual --set layer_norm_eps=1e-5
               --set linear_init=torch --set ce_padding_column=false)
SASREC=(--set model=sasrec --set num_blocks=2 --set num_heads=1 --set dropout=0.5 --set emb_dropout=0.5
        --set positional_embedding=true --set batch_size=256 --set eval_every=4 "${PROJECT_BLOCK[@]}")
[ -f "$DATA/stats.json" ] || python -m diffurec split --data ../shared/datasets/beauty/interactions.parquet --out "$DATA"
mkdir -p outputs/logs

run() {  # name, then train args; resumes a run that was cut off, skips a finished one
  local name=$1; shift
  if [ -f "outputs/runs/$name/done" ]; then return; fi
  if [ -f "outputs/runs/$name/latest.pt" ]; then python -m diffurec train --resume "$name" "${COMMON[@]}" "$@"
  else python -m diffurec train --name "$name" "${COMMON[@]}" "$@"; fi > "outputs/logs/$name.log" 2>&1
  touch "outputs/runs/$name/done"
}

jobs_list=()
for seed in $SEEDS; do
  jobs_list+=("beauty-cos40-reftf-s$seed --set seed=$seed")
done
first=$(echo "$SEEDS" | awk '{print $1}')
jobs_list+=(
  "beauty-cos40-s$first --set seed=$first ${PROJECT_BLOCK[*]} --tag ablation=reference_transformer --tag ablation_value.reference_transformer=project_block"
)
for seed in $SEEDS; do
  jobs_list+=("beauty-sasrec-b256-cos40-s$seed --set seed=$seed ${SASREC[*]}")
done
# the headline with a label-smoothed target (README, "Knobs under the full protocol")
for seed in $SEEDS; do
  jobs_list+=("beauty-cos40-ls02-s$seed --set seed=$seed --set label_smoothing=0.2")
done
# FP32=1: the headline config in fp32 too, for the report's Precision table (about 1.5x the time)
if [ "${FP32:-0}" = 1 ]; then
  for seed in $SEEDS; do
    jobs_list+=("beauty-cos40-fp32-s$seed --set seed=$seed --set precision=fp32")
  done
fi
# the first seed's reference-block run is also the reference_transformer ablation's point
run_job() { local args; read -r -a args <<< "$1"; run "${args[@]}"; }
i=0
for job in "${jobs_list[@]}"; do
  extra=""
  [ "$i" -eq 0 ] && extra=" --tag ablation=reference_transformer --tag ablation_value=reference_block"
  run_job "$job$extra" &
  i=$((i + 1))
  while [ "$(jobs -rp | wc -l)" -ge "$LANES" ]; do wait -n; done
done
wait

python pipelines/runs.py export --experiment beauty --filter "attributes.status = 'FINISHED'"
python pipelines/report.py
