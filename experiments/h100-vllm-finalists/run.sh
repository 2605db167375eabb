#!/usr/bin/env bash
# On the lent H100 (no network): the finalists of a small real-vLLM study measured again with
# confidence intervals, and their capacity under the SLO, through `tune` itself. The vLLM 0.26.0
# bundle (../h100-vllm: 7 parts in /tmp/parts) also carries Ray, Optuna and plotly.
# usage: bash experiments/h100-vllm-finalists/run.sh TRIALS [more tune flags]   (same study, resumed)
set -u
TRIALS=$1; shift
if [ ! -d /tmp/site/vllm ]; then
  cat /tmp/parts/part-* > /tmp/bundle.tar && mkdir -p /tmp/w && tar -C /tmp/w -xf /tmp/bundle.tar && \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/w/*.whl \
    || exit 1
  rm -rf /tmp/bundle.tar /tmp/w
fi
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
W=/tmp/work
mkdir -p $W
timeout -s INT "${TUNE_TIMEOUT:-86400}" python3 -m tuner --workload workloads/mooncake_conversation_head300.jsonl \
  --rows 40 --engine vllm --engine-python python3 --model-shape llama-3.1-8b --gpus 1 \
  --space experiments/h100-vllm/space.yaml --trials "$TRIALS" --seed 3 --slo ttft_p99=15s \
  --study-name h100-vllm-finalists --out $W/runs --no-mlflow \
  --engine-env VLLM_USE_FLASHINFER_SAMPLER=0 --startup-timeout 400 "$@"
rc=$?
tar -C $W --exclude='*.csv' -czf "${OUT:-/tmp}/finalists.tar.gz" runs 2>/dev/null
exit $rc
