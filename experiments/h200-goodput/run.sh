#!/usr/bin/env bash
# ON THE H200 (no network), in the project root, after .gpu/install.sh: "tuning pays" (issue #18, proof 1)
# with the product's own `tune` on real vLLM 0.26.0, an MLflow store on the machine (proof 5) and each
# server's start-up phases. Work and results go to $W (/tmp/run). Stages, one or more per device call:
#   run.sh warm             vLLM's defaults once (a one-trial study, 40 rows, in the foreground): the compile cache
#                           then holds them, as on a machine that served them before, for both studies of proof 4
#   run.sh sglang-python    write /tmp/py-sglang, SGLang's interpreter for ENGINE=vllm,sglang (proof 3)
#   run.sh study            start the study detached (setsid; log $W/tune.log) and return
#   run.sh wait SECONDS     follow the study until it ends or SECONDS pass (exit 0: ended, 3: still running)
#   run.sh first SECONDS    wait for the first trial's result (vLLM's defaults) and say if they miss the SLO
#   run.sh stop             interrupt the study (its servers and Ray go with it)
#   run.sh holdout tuned    the exported command started by hand, the hold-out slice replayed 3 times
#   run.sh holdout defaults the same with vLLM's defaults
#   run.sh holdout fp8      vLLM's defaults with --quantization fp8 (REPEATS=1 is enough to show it serves)
#   run.sh table            start-up phases of every server, and the hold-out goodput, as markdown
# PROBE=1 samples a hand-started server's stacks during start-up (probe/; summary: probe/probe_summary.py).
# ENGINE=sim runs the same logic on the simulator (CPU dry run); TS, TRIALS, BUDGET, SLO, PRESCREEN, TRAIN, MAXLEN,
# FINALISTS (0: none) override the plan;
# EXPORTED=FILE: hold out this shell line instead of `tune export`'s choice.
set -u
W=${W:-/tmp/run}
ENGINE=${ENGINE:-vllm}
TS=${TS:-12}  # the trace replayed 12x faster: ~45 req/s, ~42k prompt and ~12k output tok/s asked of one H200
TRIALS=${TRIALS:-7}
BUDGET=${BUDGET:-9m}  # the search; the finalist's and the defaults' 3 repeats come after it
SLO=${SLO:-ttft_p99=1s,tpot_p99=50ms}  # interactive chat (round 1 of this run used 2 s / 100 ms: see README)
PRESCREEN=${PRESCREEN:-sim}  # the simulator, calibrated on this H200's earlier runs, screens proposals
STUDY=${STUDY:-h200-goodput-r4}
TRAIN=${TRAIN:-workloads/azure_conv_rows0-399.jsonl}
HOLDOUT=${HOLDOUT:-workloads/azure_conv_rows17000-17349.jsonl}
MAXLEN=${MAXLEN:-6144}  # both slices fit (longest request 4,176 and 5,346 tokens); rows 400-2799 need 9216
VOCAB=128256  # the 8B stub's vocabulary: prompt token ids are drawn below it
here=$(cd "$(dirname "$0")" && pwd)

export PYTHONPATH=${SITE:-/tmp/site}:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# the hand-started servers share the study's compile cache (tuner/engines/vllm_startup.py)
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$HOME/.cache/servetune/vllm-compile}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.cache/servetune/triton}
mkdir -p "$W"
if [ "$ENGINE" = sim ]; then
  ENGINE_FLAGS=(--engine sim --gpu h200 --model-shape llama-3.1-8b --sim-time-scale "${SIM_SCALE:-10}")
elif [ "$ENGINE" = vllm,sglang ]; then  # proof 3: each engine in its own site (run.sh sglang-python writes the wrapper)
  ENGINE_FLAGS=(--engine vllm,sglang --engine-python vllm=python3 --engine-python sglang=/tmp/py-sglang
                --model-shape llama-3.1-8b --gpus 1 --engine-env vllm:VLLM_USE_FLASHINFER_SAMPLER=0
                --fix sglang:attention_backend=triton --engine-arg 'sglang:--sampling-backend pytorch'
                --startup-timeout 400)
else
  ENGINE_FLAGS=(--engine vllm --engine-python python3 --model-shape llama-3.1-8b --gpus 1
                --engine-env VLLM_USE_FLASHINFER_SAMPLER=0 --startup-timeout 400)
fi

study() {
  [ -f "$W/tune.pid" ] && kill -0 "$(cat "$W/tune.pid")" 2>/dev/null && { echo "study already running"; return 0; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/gpu.txt" 2>&1
  # the calibration an earlier study on this hardware would have left in the cache (calibrate.py)
  # (named <key>.json there; rounds 2 and 3 copied it as calibration-<key>.json, which no study looked for)
  mkdir -p "$HOME/.cache/servetune/calibration"
  for f in "$here"/calibration-*.json; do cp "$f" "$HOME/.cache/servetune/calibration/$(basename "${f#*/calibration-}")"; done
  # and vLLM 0.26.0's `serve --help=all`, captured on the H100 (tests/fixtures/vllm): no 25 s probe on a fresh machine
  mkdir -p "$HOME/.cache/servetune/help" && cp tests/fixtures/vllm/vllm-0.26.0-serve-help.txt "$HOME/.cache/servetune/help/vllm-0.26.0.txt"
  python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" > "$W/versions.txt" 2>&1
  setsid nohup python3 -m tuner run --workload "$TRAIN" --time-scale "$TS" --max-model-len "$MAXLEN" \
    "${ENGINE_FLAGS[@]}" --slo "$SLO" --trials "$TRIALS" --budget "$BUDGET" --finalists "${FINALISTS:-1}" --repeats 3 \
    --prescreen "$PRESCREEN" --prescreen-keep "${KEEP:-0.1}" \
    --seed 18 --study-name "$STUDY" --out "$W/runs" > "$W/tune.log" 2>&1 < /dev/null &
  echo $! > "$W/tune.pid"
  echo "study started (pid $(cat "$W/tune.pid")), log $W/tune.log"
}

sglang_python() {  # after `SGL_PARTS=/tmp/sglparts bash .gpu-sglang/up-sglang.sh` (install): SGLang's interpreter
  # with up-sglang.sh's environment, for `--engine-python sglang=/tmp/py-sglang` (its own site, not vLLM's)
  cat > /tmp/py-sglang <<'PY'
#!/bin/bash
export PYTHONPATH=/tmp/sglsite PATH=/tmp/sglsite/bin:$PATH CUDA_HOME=/tmp/cuda13 TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-cache \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_IS_FLASHINFER_AVAILABLE=false
exec python3 "$@"
PY
  chmod +x /tmp/py-sglang
  /tmp/py-sglang -c 'import sglang; print("sglang", sglang.__version__)' || return 1
  mkdir -p "$HOME/.cache/servetune/help"
  cp tests/fixtures/sglang/sglang-0.5.17-launch-server-help.txt "$HOME/.cache/servetune/help/sglang-0.5.17.txt"
}

warm() {
  mkdir -p "$HOME/.cache/servetune/help" && cp tests/fixtures/vllm/vllm-0.26.0-serve-help.txt "$HOME/.cache/servetune/help/vllm-0.26.0.txt"
  local t0; t0=$(date +%s)
  python3 -m tuner run --workload "$TRAIN" --rows 40 --time-scale "$TS" --max-model-len "$MAXLEN" \
    "${ENGINE_FLAGS[@]}" --slo "$SLO" --trials 1 --finalists 0 --prescreen off \
    --seed 18 --study-name warm-cache --out "$W/runs" > "$W/warm.log" 2>&1 < /dev/null
  local rc=$?
  grep -E '^\[1/' "$W/warm.log"; echo "warm-up: exit $rc after $(( $(date +%s) - t0 )) s"
  du -sm "$VLLM_CACHE_ROOT"/torch_compile_cache/* 2>/dev/null
}

snapshot() {  # the stores and the log so far into $OUT, so every call brings them back: a machine lost between
  # calls (round 6: it idled out while the next call was late) takes only what came after the last call with it
  [ -n "${OUT:-}" ] || return 0
  for f in "$W/runs/optuna.db" "$W/runs/mlflow.db"; do  # sqlite's backup: consistent while the study writes
    [ -f "$f" ] && python3 -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))' \
      "$f" "$OUT/$(basename "$f")"
  done
  for f in "$W/tune.log" "$W/warm.log"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  for f in "$W"/tune-*.log; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  return 0
}

wait_study() {
  [ -f "$W/tune.pid" ] || { echo "no study started in $W"; return 2; }
  local until=$(( $(date +%s) + ${1:-540} ))
  while kill -0 "$(cat "$W/tune.pid")" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$until" ]; then tail -n 15 "$W/tune.log"; echo "STILL RUNNING"; snapshot; return 3; fi
    sleep 5
  done
  tail -n 60 "$W/tune.log"; echo "STUDY ENDED"
  cp "$W/tune.log" "$W/tune-$STUDY.log"; snapshot
}

first_trial() {  # until the first trial (vLLM's defaults) has a result: is the load right for proof 1?
  local until=$(( $(date +%s) + ${1:-300} ))
  while ! grep -q '^\[1/' "$W/tune.log" 2>/dev/null && kill -0 "$(cat "$W/tune.pid")" 2>/dev/null; do
    [ "$(date +%s)" -lt "$until" ] || { tail -n 10 "$W/tune.log"; echo "NO RESULT YET"; return 3; }
    sleep 5
  done
  grep -E '^(study|\[1/)' "$W/tune.log"
  grep -q '^\[1/.*misses SLO' "$W/tune.log" && { echo "DEFAULTS MISS THE SLO: go on"; return 0; }
  echo "DEFAULTS MEET THE SLO (or failed): see PLAN.md, more load"; return 4
}

stop_study() {  # SIGINT: tune stops its trials and Ray itself; the process group after 90 s
  local pid; pid=$(cat "$W/tune.pid")
  kill -INT "$pid" 2>/dev/null
  for _ in $(seq 90); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -TERM -- "-$pid" 2>/dev/null
  sleep 5; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null
}

# start_server NAME PORT CMD...: detached, its log in $W, wait until /health answers; phases to $W/NAME.phases.json
start_server() {
  local name=$1 port=$2; shift 2
  echo "$*" > "$W/$name.cmd"
  local t0; t0=$(date +%s.%N)
  local probe=()  # PROBE=1: every process of this server samples its stacks (probe/sitecustomize.py)
  [ -n "${PROBE:-}" ] && { mkdir -p "$W/probe"; probe=(env "PYTHONPATH=$here/probe:$PYTHONPATH" "STACKPROBE_OUT=$W/probe/$name"); }
  setsid nohup "${probe[@]}" "$@" --host 127.0.0.1 --port "$port" --served-model-name servetune-model \
    > "$W/$name.server.log" 2>&1 < /dev/null &
  echo $! > "$W/$name.pid"
  local until=$(( $(date +%s) + 400 ))
  while ! curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 "$(cat "$W/$name.pid")" 2>/dev/null || { echo "$name server DIED"; tail -n 40 "$W/$name.server.log"; return 1; }
    [ "$(date +%s)" -lt "$until" ] || { echo "$name server not ready after 400 s"; tail -n 20 "$W/$name.server.log"
                                        stop_server "$name"; return 1; }
    sleep 0.5
  done
  local ready; ready=$(python3 -c "import time; print(round(time.time() - $t0, 2))")
  python3 "$here/phases.py" one "$W/$name.server.log" "$t0" "$ready" > "$W/$name.phases.json"
  echo "$name ready after $ready s: $(cat "$W/$name.phases.json")"
}

stop_server() {  # by the process group this script started, never by name
  local pid; pid=$(cat "$W/$1.pid")
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null
  sleep 3  # the GPU memory back before the next server
}

holdout() {
  local which=$1 port=8200 cmd=()
  local storage="sqlite:///$W/runs/optuna.db"
  if [ "$which" = tuned ]; then
    if [ -n "${EXPORTED:-}" ]; then cp "$EXPORTED" "$W/exported.txt"  # a command chosen by hand
    else python3 -m tuner export --study "$STUDY" --storage "$storage" --slo "$SLO" > "$W/exported.txt" ||
      python3 -m tuner export --study "$STUDY" --storage "$storage" > "$W/exported.txt" || return 1
    fi
    cat "$W/exported.txt"
    mapfile -t cmd < <(python3 "$here/phases.py" runnable "$W/exported.txt")
  else
    mapfile -t cmd < <(python3 "$here/phases.py" defaults "$ENGINE" "$MAXLEN" "${SIM_SCALE:-10}")
    port=8201
    [ "$which" = fp8 ] && { cmd+=(--quantization fp8); port=8202; }  # proof 2: fp8 weights start and serve
  fi
  [ "${#cmd[@]}" -gt 2 ] || { echo "no command to start (see $W/exported.txt)"; return 1; }
  start_server "$which" "$port" "${cmd[@]}" || return 1
  local clock=(); [ "$ENGINE" = sim ] && clock=(--clock-scale "${SIM_SCALE:-10}")
  for k in $(seq "${REPEATS:-3}"); do
    python3 -m tuner bench --url "http://127.0.0.1:$port" --workload "$HOLDOUT" --time-scale "$TS" \
      --slo "$SLO" --vocab-size "$VOCAB" --warmup 2 --seed "$k" "${clock[@]}" --out "$W/bench/$which-$k" \
      > "$W/bench-$which-$k.txt" 2>&1
    grep -E "^(Failed requests|Request goodput|Output token throughput|P99 TTFT|P99 TPOT)" "$W/bench-$which-$k.txt" |
      tr -s ' ' | paste -sd ';' | sed "s/^/$which $k: /"
  done
  # TRAIN_REPEATS=N: this cold process also replays the study's own slice: against the study's re-measurements
  # of the same flags on forked servers, fast start against cold (fast_vs_cold.py)
  for k in $(seq "${TRAIN_REPEATS:-0}"); do
    python3 -m tuner bench --url "http://127.0.0.1:$port" --workload "$TRAIN" --time-scale "$TS" \
      --slo "$SLO" --vocab-size "$VOCAB" --warmup 2 --seed "$k" "${clock[@]}" --out "$W/bench/$which-train-$k" \
      > "$W/bench-$which-train-$k.txt" 2>&1
    grep -E "^(Request goodput|Output token throughput)" "$W/bench-$which-train-$k.txt" | tr -s ' ' | paste -sd ';' |
      sed "s/^/$which on the study slice $k: /"
  done
  stop_server "$which"
}

case "${1:-}" in
  warm) warm ;;
  sglang-python) sglang_python ;;
  study) study ;;
  wait) wait_study "${2:-540}" ;;
  first) first_trial "${2:-300}" ;;
  stop) stop_study ;;
  holdout) holdout "${2:?tuned, defaults or fp8}" ;;
  table) python3 "$here/phases.py" table "$W" | tee "$W/phases.md" ;;
  *) sed -n 2,16p "$0"; exit 2 ;;
esac
