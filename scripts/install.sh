#!/usr/bin/env bash
# Install evolution and its dependencies into a virtual environment (default: .venv).
#
#   bash scripts/install.sh [VENV_DIR]
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
VENV="${1:-.venv}"
LLAMA_VERSION="0.3.36"
LLAMA_CMAKE_ARGS="${EVOLUTION_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
TORCH_SPEC="${EVOLUTION_TORCH:-torch==2.13.0}"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH_SPEC"

key=$(printf '%s %s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/evolution/wheels/llama-cpp-python-$LLAMA_VERSION-$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION (portable, about 6 minutes on 2 cores) into $wheels"
    mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$PY" -m pip wheel --quiet --no-deps --no-cache-dir \
        -w "$wheels.tmp" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
"$PY" -m pip install --quiet --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
"$PY" -m pip install --quiet -e ".[test,bench]"
echo "installed into $VENV"
