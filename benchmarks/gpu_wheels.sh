#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what benchmarks/gpu_check.sh needs on a bare GPU image that has
# torch, numpy, pandas, pyarrow, pytest and aiohttp but not Ray or MLflow (Python 3.12):
#   .gpu/whl     Ray 2.60 (its wheel less the Java jars, RLlib, Serve, LLM and source maps, to
#                fit the 64 MiB a device call carries), mlflow-skinny and the packages both
#                import that the image lacks;
#   .gpu/beauty, .gpu/ml-1m  the prepared datasets (the device does not see ../shared).
# Then: device run with carry [".gpu"] and the command
#   OUT=$OUT STEPS=m bash benchmarks/gpu_check.sh 2>&1                  (ML-1M first)
#   OUT=$OUT DATA=.gpu/beauty bash benchmarks/gpu_check.sh 2>&1         (then the rest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TMP=$(mktemp -d)
download() {
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 --platform any -d "$1" "${@:2}"
}
mkdir -p .gpu/whl
download "$TMP" ray==2.60.0
# mlflow-skinny's own bounds (cachetools<8, importlib-metadata<10): pip download --no-deps does not apply them
download .gpu/whl mlflow-skinny==3.17.2 'cachetools<8' databricks-sdk fastapi gitpython gitdb smmap google-auth \
    pyasn1 pyasn1-modules 'importlib-metadata<10' opentelemetry-api opentelemetry-proto opentelemetry-sdk \
    opentelemetry-semantic-conventions opentelemetry-exporter-prometheus pydantic pydantic-core python-dotenv \
    sqlparse starlette uvicorn jsonschema jsonschema-specifications referencing rpds-py tensorboardX \
    typing-inspection annotated-types aiohttp-cors colorful smart-open platformdirs opencensus \
    opencensus-context googleapis-common-protos google-api-core proto-plus
$PY - "$TMP"/ray-*.whl .gpu/whl/ray-2.60.0-slim.whl <<'PYEOF'
import sys, zipfile
drop = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/tests/", "ray/tune/examples", "ray/train/examples")
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if not (info.filename.startswith(drop) or info.filename.endswith(".map")):
            out.writestr(info, src.read(info.filename))
PYEOF
rm -rf "$TMP"
for dataset in beauty ml-1m; do
    if [ ! -d ".gpu/$dataset" ]; then
        $PY -m diffurec split --data "../shared/datasets/$dataset/interactions.parquet" --out ".gpu/$dataset" >/dev/null
    fi
done
du -sh .gpu
