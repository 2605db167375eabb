#!/usr/bin/env bash
# On the lent H100 (no network): install the carried SGLang 0.5.17 bundle (.gpu-sglang/up-sglang.sh) and
# the tuner's own dependencies (Ray, Optuna, SQLAlchemy, ...: /tmp/prodparts), then run the product's
# own `tune` against real SGLang with a Llama-3.1-8B-shaped dummy model. Resumable: call again with a
# larger TRIALS and the same study continues. Results are packed into $OUT/h100-sglang.tar.gz.
# usage: bash experiments/h100-sglang/run.sh TRIALS BUDGET [STUDY [more tune flags]]   (e.g. 3 5m)
set -u
TRIALS=$1 BUDGET=$2 STUDY=${3:-h100-sglang-mooncake40}
shift $(( $# < 3 ? $# : 3 ))
if [ ! -f /tmp/site-prod/.complete ]; then
  cat /tmp/prodparts/prod-* > /tmp/prod.tar && mkdir -p /tmp/prodw && tar -C /tmp/prodw -xf /tmp/prod.tar && \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-prod /tmp/prodw/*.whl \
    && touch /tmp/site-prod/.complete || exit 1
  rm -rf /tmp/prod.tar /tmp/prodw
fi
if [ -d .gpu-sglang/plotly ] && [ ! -d /tmp/site-prod/plotly ]; then  # carried later, for pareto.html
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-prod .gpu-sglang/plotly/*.whl
fi
bash .gpu-sglang/up-sglang.sh || exit 1   # install only; prints the version
# the environment up-sglang.sh documents, for the tuner and every server it starts
export PYTHONPATH=/tmp/sglsite:/tmp/site-prod:$PWD PATH=/tmp/sglsite/bin:$PATH CUDA_HOME=/tmp/cuda13 \
  TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_IS_FLASHINFER_AVAILABLE=false \
  PYTHONUNBUFFERED=1
W=/tmp/work
mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout -s INT "${TUNE_TIMEOUT:-86400}" python3 -m tuner --workload workloads/mooncake_conversation_head300.jsonl --rows 40 \
  --engine sglang --engine-python python3 --model-shape llama-3.1-8b --gpus 1 \
  --space experiments/h100-sglang/space.yaml --trials "$TRIALS" --budget "$BUDGET" --seed 1 \
  --study-name "$STUDY" --out $W/runs --no-mlflow \
  --engine-arg='--attention-backend triton --sampling-backend pytorch' --startup-timeout 400 "$@"
rc=$?
tar -C $W --exclude='*.csv' -czf "${OUT:-/tmp}/h100-sglang.tar.gz" runs 2>/dev/null
tar -C $W -czf "${OUT:-/tmp}/h100-sglang-rows.tar.gz" runs 2>/dev/null
exit $rc
