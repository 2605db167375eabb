#!/usr/bin/env bash
# Run HERE (no GPU), in the project's root: builds .gpu/ (git-ignored) with every wheel the H200 run
# needs beyond the GPU image (vLLM 0.26.0 + compressed-tensors/loguru for fp8, the tuner's Optuna/Ray,
# the MLflow tracking client), packed into one tar split in parts that each travel in one device call
# together with the working tree. Writes .gpu/MANIFEST.txt with the parts, their sizes and the calls.
# usage: experiments/h200-goodput/stage.sh [PART_SIZE, default: 60 MiB minus the working tree, rounded down]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(git rev-parse --show-toplevel); cd "$root"
git check-ignore -q .gpu/x || { echo "stage.sh: .gpu/ is not git-ignored in $root; add /.gpu/ to .gitignore" >&2; exit 2; }
tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | while read -r f; do [ -f "$f" ] && echo "$f"; done \
  | tr '\n' '\0' | xargs -0 du -cb | tail -1 | cut -f1)
tree_mib=$(( (tree + 1048575) / 1048576 ))
size=${1:-$(( 60 - tree_mib - 2 ))M}
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
plats=""; for n in 5 12 17 18 24 25 26 27 28 31 34 35; do plats="$plats --platform manylinux_2_${n}_x86_64"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plats --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$w/wheels" \
  -r "$root/../shared/gpu/vllm-0.26.0-gpu-wheels.txt" -r "$here/tuner-mlflow-wheels.txt" 2>&1 | grep -v '^WARNING: Location' || true
# one version of each distribution, or pip --no-deps installs both and the later one wins silently
dups=$(ls "$w/wheels" | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "stage.sh: two versions of: $dups" >&2; exit 2; }
rm -rf .gpu && mkdir -p .gpu
tar --sort=name --owner=0 --group=0 --mtime='2026-01-01' -C "$w/wheels" -cf "$w/bundle.tar" .
sha=$(sha256sum "$w/bundle.tar" | cut -d' ' -f1)
(cd .gpu && split -b "$size" -d -a 2 "$w/bundle.tar" part-)
cp "$here/install.sh" "$root/../shared/gpu/make_stub_model.py" .gpu/
echo "$sha  bundle.tar" > .gpu/bundle.sha256
n=$(ls .gpu/part-* | wc -l); last=$(ls .gpu/part-* | tail -1)
{
  echo "# .gpu/ built $(date -u +%FT%TZ) by experiments/h200-goodput/stage.sh from $root"
  echo "# working tree that travels with every call: $tree bytes ($tree_mib MiB); part size $size"
  echo "# bundle.tar sha256 $sha, $(stat -c %s "$w/bundle.tar") bytes, $(ls "$w/wheels" | wc -l) wheels, $n parts"
  echo "## parts (bytes, file)"
  for p in .gpu/part-*; do echo "$(stat -c %s "$p") $p"; done
  echo "## wheels"
  ls "$w/wheels"
  echo "## device calls, back to back (the machine keeps /tmp only while warm, ~30 s after a call)"
  for p in .gpu/part-*; do
    if [ "$p" = "$last" ]; then
      echo "run carry=[\"$p\", \".gpu/install.sh\", \".gpu/make_stub_model.py\", \".gpu/bundle.sha256\"]" \
           "command: mkdir -p /tmp/parts && cp $p .gpu/bundle.sha256 /tmp/parts/ && bash .gpu/install.sh"
    else
      echo "run carry=[\"$p\"] command: mkdir -p /tmp/parts && cp $p /tmp/parts/ && ls -l /tmp/parts"
    fi
  done
  echo "## then, in any later call on the same machine: export PYTHONPATH=/tmp/site:\$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1"
  echo "## the H200 goodput run's calls (the study, hold-out, collect): experiments/h200-goodput/PLAN.md"
} > .gpu/MANIFEST.txt
cat .gpu/MANIFEST.txt | grep -v '\.whl$'
