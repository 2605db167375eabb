#!/usr/bin/env bash
# On the lent 2×H200 machine: install the carried wheels once, then `tune --gpus 2` against real
# vLLM 0.26.0 (Llama-3.1-8B shape, dummy weights). Results are packed into $OUT/h200x2.tar.gz.
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
nvidia-smi topo -m > "${OUT:-/tmp}/topology.txt" 2>&1
python3 -m tuner --workload workloads/mooncake_conversation_head300.jsonl --rows 40 \
  --engine vllm --engine-python python3 --model-shape llama-3.1-8b --gpus 2 \
  --space experiments/h200x2-vllm/space.yaml --sampler grid --seed 0 --trials 3 \
  --study-name h200x2-vllm-mooncake40 --out $W/runs --no-mlflow \
  --engine-env VLLM_USE_FLASHINFER_SAMPLER=0 --startup-timeout 400
rc=$?
tar -C $W --exclude='*.csv' -czf "${OUT:-/tmp}/h200x2.tar.gz" runs 2>/dev/null
exit $rc
