#!/usr/bin/env bash
# ON THE GPU MACHINE, in the project root, once every .gpu/part-NN is in /tmp/parts (with bundle.sha256):
# checks and unpacks the bundle and installs every wheel into /tmp/site, then proves the imports.
# Idempotent: a second call on the same machine only re-checks the imports. (PARTS, SITE: other folders; IMPORTS: other
# modules to check.)
set -u
PARTS=${PARTS:-/tmp/parts} SITE=${SITE:-/tmp/site}
if [ ! -f "$SITE/.servetune-installed" ]; then
  w=$(mktemp -d) || exit 1
  cat "$PARTS"/part-* > "$w/bundle.tar" || exit 1
  want=$(cut -d' ' -f1 "$PARTS/bundle.sha256"); got=$(sha256sum "$w/bundle.tar" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "install.sh: bundle sha256 $got, expected $want (a part is missing or cut)"; ls -l "$PARTS"; exit 1; }
  mkdir -p "$w/wheels" && tar -C "$w/wheels" -xf "$w/bundle.tar" && rm "$w/bundle.tar" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$w"/wheels/*.whl || exit 1
  rm -rf "$w" && touch "$SITE/.servetune-installed"
fi
export PYTHONPATH=$SITE VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
python3 - <<'PY' || exit 1
import importlib, os
names = os.environ.get("IMPORTS", "vllm optuna ray mlflow compressed_tensors loguru").split()
print("installed:", *(f"{n} {getattr(importlib.import_module(n), '__version__', '?')}" for n in names))
PY
