#!/usr/bin/env bash
# ON THE GPU MACHINE, in the project root, once every .gpu/part-NN is in /tmp/parts (with bundle.sha256):
# checks and unpacks the bundle and installs every wheel into /tmp/site, then proves the imports.
# Idempotent: a second call on the same machine only re-checks the imports.
set -u
if [ ! -f /tmp/site/.servetune-installed ]; then
  cat /tmp/parts/part-* > /tmp/bundle.tar || exit 1
  want=$(cut -d' ' -f1 /tmp/parts/bundle.sha256); got=$(sha256sum /tmp/bundle.tar | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "install.sh: bundle sha256 $got, expected $want (a part is missing or cut)"; ls -l /tmp/parts; exit 1; }
  rm -rf /tmp/w && mkdir -p /tmp/w && tar -C /tmp/w -xf /tmp/bundle.tar && rm /tmp/bundle.tar || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/w/*.whl || exit 1
  rm -rf /tmp/w && touch /tmp/site/.servetune-installed
fi
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
python3 -c "import vllm, optuna, ray, mlflow, compressed_tensors, loguru
print('installed: vllm', vllm.__version__, 'optuna', optuna.__version__, 'ray', ray.__version__,
      'mlflow', mlflow.__version__, 'compressed_tensors', compressed_tensors.__version__)" || exit 1
