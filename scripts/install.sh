#!/usr/bin/env bash
# Install evolution and its dependencies into a virtual environment (default: .venv).
#
#   bash scripts/install.sh [--gpu] [VENV_DIR]
#
# --gpu (a CUDA host): torch's CUDA build from PyPI, the `gpu` extra (Unsloth, which pins
# transformers<=5.17, trl<=1.15, datasets<5 inside this project's ranges) and llama.cpp built with
# CUDA for serving. It needs the CUDA toolkit's nvcc on PATH, and checks that first.
#
# Two things are done by hand before `pip install -e .`, each for a reason:
#  - torch is pinned to the CPU build (`torch==2.13.0` is a CPU wheel here); a plain `torch`
#    pulls several GB of CUDA packages. On a CUDA host set EVOLUTION_TORCH to the build you want.
#  - llama-cpp-python builds from source. A default build uses -march=native, and on CPUs with
#    AMX (Sapphire Rapids and later) that build segfaults in llama_decode on any multi-token
#    batch (seen with 0.3.36 on this machine). We build a portable AVX2 wheel instead, once,
#    and keep it in ~/.cache/evolution/wheels keyed by version and flags (~6 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=0
if [ "${1:-}" = "--gpu" ]; then GPU=1; shift; fi
VENV="${1:-.venv}"
LLAMA_VERSION="0.3.36"
EXTRAS="test,bench,chroma"  # chroma: so that its backend is tested, not skipped
if [ "$GPU" = 1 ]; then
    if [ -z "${EVOLUTION_LLAMA_CMAKE_ARGS:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
        echo "install.sh --gpu: nvcc (the CUDA toolkit) is not on PATH; llama.cpp is built with CUDA for serving." >&2
        echo "Install the CUDA toolkit, or set EVOLUTION_LLAMA_CMAKE_ARGS to build llama.cpp for the CPU." >&2
        exit 1
    fi
    # PyPI's torch 2.13.0 on Linux x86_64 is the CUDA build (Unsloth 2026.10 needs torch <2.15).
    TORCH_SPEC="${EVOLUTION_TORCH:-torch==2.13.0}"
    LLAMA_CMAKE_ARGS="${EVOLUTION_LLAMA_CMAKE_ARGS:--DGGML_CUDA=ON -DGGML_NATIVE=OFF}"
    EXTRAS="test,bench,chroma,gpu"
else
    TORCH_SPEC="${EVOLUTION_TORCH:-torch==2.13.0}"
    LLAMA_CMAKE_ARGS="${EVOLUTION_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH_SPEC"

key=$(printf '%s %s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/evolution/wheels/llama-cpp-python-$LLAMA_VERSION-$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION ($LLAMA_CMAKE_ARGS; about 6 minutes on 2 cores) into $wheels"
    mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$PY" -m pip wheel --quiet --no-deps --no-cache-dir \
        -w "$wheels.tmp" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
"$PY" -m pip install --quiet --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
"$PY" -m pip install --quiet -e ".[$EXTRAS]"
echo "installed into $VENV"
