#!/usr/bin/env bash
# Run HERE (not on the GPU machine), in the project's root. Rebuilds .gpu-sglang/part-NN: the wheels
# SGLang 0.5.17 needs on the GPU machine (torch 2.11.0+cu130, triton, nvidia libs, numpy, aiohttp... are
# there), minus what a Llama model with --attention-backend triton --sampling-backend pytorch never loads:
#   sglang-kernel: drop flash_ops.abi3.so (FA3, 1 GB), sm100/common_ops (Blackwell), infllm_ops
#   xgrammar: drop lib/libxgrammar.a (static lib for C++ users)
#   flashinfer-python: drop data/cutlass and data/cccl headers (imported unconditionally, never run here)
#   nvidia-nvvm: drop lib/libnvvm.so (cicc does not need it); nvidia-cuda-nvcc: drop nvlink
# nvcc/cicc/ptxas + CCCL/crt headers + ninja are bundled because sglang 0.5.17 JIT-compiles (tvm-ffi)
# its rope, silu_and_mul, KV-store and clamp_position kernels on first use.
# usage: .gpu-sglang/stage-sglang.sh [PART_SIZE=55M] [JIT_CACHE_DIR]
#   JIT_CACHE_DIR (default .gpu-sglang/tvm-ffi-cache): kernels prebuilt for sm_90a, copied as tvm-ffi-cache/
set -euo pipefail
size=${1:-55M}; jit=${2:-$(dirname "$0")/tvm-ffi-cache}
here=$(cd "$(dirname "$0")" && pwd)
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
plats=""; for n in 5 12 17 18 24 25 26 27 28 31 34 35; do plats="$plats --platform manylinux_2_${n}_x86_64"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plats --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$w/dl" -r "$here/sglang-0.5.17-gpu-wheels.txt"
strip() {  # strip WHEEL_GLOB PREFIX... : rewrite the wheel without entries starting with any PREFIX
  python3 - "$@" <<'EOF'
import glob, sys, zipfile, os
src = glob.glob(sys.argv[1])[0]; drop = tuple(sys.argv[2:]); tmp = src + ".tmp"
zi = zipfile.ZipFile(src)
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
    for i in zi.infolist():
        if i.filename.startswith(drop): continue
        data = zi.read(i.filename)
        if i.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not l.decode().startswith(drop))
        zo.writestr(i, data, compress_type=zipfile.ZIP_DEFLATED)
zi.close(); os.replace(tmp, src)
EOF
}
strip "$w/dl/sglang_kernel-*.whl" sgl_kernel/flash_ops.abi3.so sgl_kernel/sm100/ sgl_kernel/infllm_ops
strip "$w/dl/xgrammar-*.whl" xgrammar/lib/libxgrammar.a
strip "$w/dl/flashinfer_python-*.whl" flashinfer/data/cutlass/ flashinfer/data/cccl/
strip "$w/dl/nvidia_nvvm-*.whl" nvidia/cu13/lib/libnvvm.so
strip "$w/dl/nvidia_cuda_nvcc-*.whl" nvidia/cu13/bin/nvlink nvidia/cu13/bin/__nvcc_device_query
if [ -n "$jit" ]; then
  for d in "$jit"/*/; do d=${d%/}; ls "$d"/*.so >/dev/null 2>&1 || continue
    mkdir -p "$w/dl/tvm-ffi-cache/$(basename "$d")" && cp "$d"/*.so "$w/dl/tvm-ffi-cache/$(basename "$d")/"; done
fi
grep -qx '.gpu-sglang/' .git/info/exclude 2>/dev/null || echo '.gpu-sglang/' >> .git/info/exclude
rm -f "$here"/part-*
tar --sort=name --owner=0 --group=0 --mtime='2026-01-01' -C "$w/dl" -cf "$w/bundle.tar" .
sha=$(sha256sum "$w/bundle.tar" | cut -d' ' -f1)
(cd "$here" && split -b "$size" -d -a 2 "$w/bundle.tar" part-)
n=$(ls "$here"/part-* | wc -l)
sed -i "s/^SHA=.*/SHA=$sha/; s/^NPARTS=.*/NPARTS=$n/" "$here/up-sglang.sh"
ls -l "$here"/part-*; echo "bundle $(( $(stat -c %s "$w/bundle.tar") / 1048576 )) MiB in $n parts, sha256 $sha"
