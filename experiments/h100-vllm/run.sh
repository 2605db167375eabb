#!/usr/bin/env bash
# On the lent H100 (no network): install the carried wheels once, then run the product's own `tune`
# against real vLLM 0.26.0 with a Llama-3.1-8B-shaped dummy model. Resumable: call again with a
# larger TRIALS and the same study continues. Results are packed into $OUT/h100.tar.gz.
# usage: bash experiments/h100-vllm/run.sh TRIALS BUDGET   (e.g. 4 6m)
set -u
if [ ! -d /tmp/site/vllm ]; then
  cat /tmp/parts/part-* > /tmp/bundle.tar && mkdir -p /tmp/w && tar -C /tmp/w -xf /tmp/bundle.tar && \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/w/*.whl \
    || exit 1
  rm -rf /tmp/bundle.tar /tmp/w
fi
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
W=/tmp/work
mkdir -p $W
python3 -m tuner --workload workloads/mooncake_conversation_head300.jsonl --rows 40 \
  --engine vllm --engine-python python3 --model-shape llama-3.1-8b --gpus 1 \
  --space experiments/h100-vllm/space.yaml --trials "$1" --budget "$2" --seed 1 \
  --study-name h100-vllm-mooncake40 --out $W/runs --no-mlflow \
  --engine-env VLLM_USE_FLASHINFER_SAMPLER=0 --startup-timeout 400
rc=$?
tar -C $W --exclude='*.csv' -czf "${OUT:-/tmp}/h100.tar.gz" runs 2>/dev/null
tar -C $W -czf "${OUT:-/tmp}/h100-rows.tar.gz" runs 2>/dev/null
exit $rc
