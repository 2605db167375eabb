#!/usr/bin/env bash
# ON THE H200, after run.sh: the results into $OUT (the device tool brings back at most 8 files, 16 MiB each):
# optuna.db, mlflow.db, report.md, pareto.png, phases.md, tune.log, tvm-ffi-cache.tar.gz (SGLang only) and everything else of $W (trial and
# hand-started server logs, start-up phases, bench summaries and rows, commands, GPU and versions) in one tar.
set -u
W=${W:-/tmp/run}; OUT=${OUT:?set OUT}; STUDY=${STUDY:-h200-goodput-r4}
here=$(cd "$(dirname "$0")" && pwd)
du -sm "${VLLM_CACHE_ROOT:-$HOME/.cache/servetune/vllm-compile}"/torch_compile_cache/* > "$W/compile-cache-du.txt" 2>&1
rm -f "$OUT"/warm.log "$OUT"/tune-*.log  # run.sh wait's snapshot, when in the same call: they are in the tar below
[ -f "$W/phases.md" ] || bash "$here/run.sh" table > /dev/null
cp "$W/runs/optuna.db" "$W/runs/mlflow.db" "$W/runs/$STUDY/report.md" "$W/runs/$STUDY/pareto.png" \
   "$W/phases.md" "$W/tune.log" "$OUT/" 2>&1
# SGLang's JIT kernels built on this machine (sm_90a): stage-sglang.sh carries them prebuilt next time
[ -d /tmp/tvm-ffi-cache ] && tar -C /tmp -czf "$OUT/tvm-ffi-cache.tar.gz" tvm-ffi-cache
tar -C "$W" --exclude='optuna.db' --exclude='mlflow.db' --exclude='*.pid' -czf "$OUT/results.tar.gz" .
ls -l "$OUT"
big=$(find "$OUT" -type f -size +16M); [ -z "$big" ] || { echo "over 16 MiB, will not come back: $big"; exit 1; }
