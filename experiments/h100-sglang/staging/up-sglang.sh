#!/bin/bash
# ON THE GPU MACHINE (no network), from the project root, after every .gpu-sglang/part-NN has been moved
# to /tmp/parts/ (one device call each, back to back). Installs SGLang 0.5.17 into /tmp/sglsite (once per
# machine), builds a CUDA_HOME for sglang's JIT kernels from the bundled nvcc + torch's CUDA libs, writes
# the config-only Llama-3.1-8B-shaped model /tmp/stub8b and, given a PORT, starts the server detached
# (setsid) so it outlives the call, then waits for /health.
#
# usage: bash .gpu-sglang/up-sglang.sh                 install only (and print the version)
#        bash .gpu-sglang/up-sglang.sh PORT [extra sglang.launch_server args]
#
# Environment for anything else that imports sglang on that machine (the script sets these itself):
#   export PYTHONPATH=/tmp/sglsite            # the bundle; shadows the image's transformers 5.17 with 5.12.1
#   export PATH=/tmp/sglsite/bin:$PATH        # ninja (JIT builds)
#   export CUDA_HOME=/tmp/cuda13              # nvcc 13.0 from the bundle + torch's CUDA headers/libs
#   export TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-cache   # JIT kernel cache (sglang compiles rope/activation/... on first use)
#   export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
#   export SGLANG_IS_FLASHINFER_AVAILABLE=false   # flashinfer is bundled only as an import (no JIT cache,
#                                                 # cutlass headers stripped); keeps defaults off it
# Always pass --attention-backend triton (the script does): sglang's H100 default, fa3, needs
# sgl_kernel/flash_ops.abi3.so, which is stripped from the bundle (1 GB).
# Stop a server by its own pid (/tmp/sglang-PORT.pid), never by a name pattern.
set -u
PARTS=${SGL_PARTS:-/tmp/parts}
SITE=${SGL_SITE:-/tmp/sglsite}
SHA=2379b4466d1ba1718d9732dcf05bfabb3ac4a61a0fe0fa8bd81fd58c2c0c309f
NPARTS=3
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$SITE" PATH="$SITE/bin:$PATH" CUDA_HOME=/tmp/cuda13 TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-cache \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_IS_FLASHINFER_AVAILABLE=${SGLANG_IS_FLASHINFER_AVAILABLE:-false}

if [ ! -f "$SITE/.sgl-complete" ]; then
  n=$(ls "$PARTS"/part-* 2>/dev/null | wc -l)
  [ "$n" -eq "$NPARTS" ] || { echo "need $NPARTS parts in $PARTS, found $n: $(ls "$PARTS" 2>/dev/null | tr '\n' ' ')"; exit 1; }
  cat "$PARTS"/part-* > /tmp/sglb.tar
  got=$(sha256sum /tmp/sglb.tar | cut -d' ' -f1)
  [ "$got" = "$SHA" ] || { echo "bundle sha256 mismatch: $got (parts incomplete, corrupt or from another bundle)"; exit 1; }
  rm -rf /tmp/sglw && mkdir -p /tmp/sglw && tar -C /tmp/sglw -xf /tmp/sglb.tar && rm -f /tmp/sglb.tar || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" /tmp/sglw/*.whl || exit 1
  # JIT kernels prebuilt for sm_90a (activation, fused rope, kv store, clamp_position): loaded by their
  # content hash, so a fresh machine skips ~7 s of nvcc per kernel; anything else still compiles.
  mkdir -p "$TVM_FFI_CACHE_DIR" && cp -rn /tmp/sglw/tvm-ffi-cache/. "$TVM_FFI_CACHE_DIR/" 2>/dev/null
  rm -rf /tmp/sglw && touch "$SITE/.sgl-complete"
fi

# CUDA_HOME for tvm-ffi JIT: bin/ (real copy, nvcc finds its profile next to itself), nvvm/ (cicc),
# include/ = torch's nvidia/cu13/include + bundled crt/cccl headers, lib64/ = torch's CUDA libs.
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  rm -rf "$CUDA_HOME" && mkdir -p "$CUDA_HOME/include" "$CUDA_HOME/lib64"
  for d in $(python3 -c "import importlib.util as u; print('\n'.join(u.find_spec('nvidia.cu13').submodule_search_locations))"); do
    [ -x "$d/bin/nvcc" ] && { cp -r "$d/bin" "$CUDA_HOME/bin"; ln -sfn "$d/nvvm" "$CUDA_HOME/nvvm"; }
    [ -d "$d/include" ] && for f in "$d"/include/*; do ln -sfn "$f" "$CUDA_HOME/include/$(basename "$f")"; done
    [ -d "$d/lib" ] && for f in "$d"/lib/*; do ln -sfn "$f" "$CUDA_HOME/lib64/$(basename "$f")"; done
  done
  [ -e "$CUDA_HOME/lib64/libcudart.so" ] || ln -sfn libcudart.so.13 "$CUDA_HOME/lib64/libcudart.so"
fi
[ -e "$CUDA_HOME/include/cuda_runtime.h" ] || echo "WARNING: no cuda_runtime.h under $CUDA_HOME/include (torch's nvidia/cu13 headers not found): JIT kernels will fail"
command -v c++ >/dev/null || echo "WARNING: no host C++ compiler (c++) on PATH: sglang's JIT kernels (rope, silu_and_mul) cannot be built"
python3 -c 'import sglang; print("sglang", sglang.__version__)' 2>&1 | tail -1

[ -d /tmp/stub8b ] || python3 "$here/make_stub_model.py" /tmp/stub8b llama8b 2>/dev/null \
  || python3 /work/shared/gpu/make_stub_model.py /tmp/stub8b llama8b 2>/dev/null \
  || python3 "$(dirname "$here")/../shared/gpu/make_stub_model.py" /tmp/stub8b llama8b
[ -f /tmp/stub8b/config.json ] || { echo "could not write /tmp/stub8b (make_stub_model.py not found)"; exit 1; }

[ -z "${1:-}" ] && exit 0
PORT=$1; shift
LOG=/tmp/sglang-$PORT.log
setsid nohup python3 -m sglang.launch_server --model-path /tmp/stub8b --load-format dummy \
  --host 127.0.0.1 --port "$PORT" --served-model-name stub --attention-backend triton \
  --sampling-backend pytorch --skip-server-warmup "$@" > "$LOG" 2>&1 < /dev/null &
pid=$!; echo "$pid" > "/tmp/sglang-$PORT.pid"
t0=$(date +%s)
while [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health")" != 200 ]; do
  sleep 2
  kill -0 "$pid" 2>/dev/null || { echo "DIED (pid $pid)"; tail -80 "$LOG"; exit 1; }
  [ $(( $(date +%s) - t0 )) -gt 600 ] && { echo "TIMEOUT (pid $pid still running)"; tail -60 "$LOG"; exit 1; }
done
echo "ready after $(( $(date +%s) - t0 )) s, pid $pid, log $LOG"
tail -25 "$LOG"
