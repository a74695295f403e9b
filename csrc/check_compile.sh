#!/usr/bin/env bash
# Compile check of csrc/ for machines without a GPU (CI): `nvcc -c` of every csrc/*.cu and of the
# emulator's csrc/emulator/faults.cu for sm_80 and sm_90 with the flags torch's extension build
# adds, warnings as errors; and bindings.cpp
# against the headers of the torch that PYTHON imports (a CPU wheel will do). Objects go to a
# temporary directory and are deleted. Fails if nvcc is missing: set NVCC=/path/to/nvcc.
# The language standard is C++17 (CSRC_STD overrides, e.g. CSRC_STD=c++20): setup.py allows
# torch from 2.5, whose extension builds pass -std=c++17; newer torch passes c++20, which
# accepts what compiles here.
#
# usage: csrc/check_compile.sh [PYTHON]     PYTHON defaults to .venv/bin/python, then python3
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
    echo "csrc/check_compile.sh: nvcc not found on PATH or at /usr/local/cuda/bin/nvcc;" \
        "install the CUDA toolkit or set NVCC=/path/to/nvcc" >&2
    exit 1
fi
python="${1:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# As torch.utils.cpp_extension compiles .cu files, so that what passes here builds there.
torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
std="${CSRC_STD:-c++17}"
cu_flags=(-std="$std" -O3 --Werror all-warnings "${torch_flags[@]}"
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

echo "csrc: $("$nvcc" --version | tail -1), -std=$std"
start=$SECONDS
pids=()
names=()
for src in "$here"/*.cu "$here"/emulator/*.cu; do
    name="$(basename "$src")"
    "$nvcc" "${cu_flags[@]}" -c "$src" -o "$out/$name.o" >"$out/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
done

# bindings.cpp needs torch's headers (and Python's). A CPU wheel lacks one generated CUDA
# header, c10/cuda/impl/cuda_cmake_macros.h; a stub stands in for it.
if torch_include="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"; then
    py_include="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    mkdir -p "$out/stub/c10/cuda/impl"
    if [[ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
        printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
            >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
    fi
    "$nvcc" -std="$std" -O0 -Xcompiler -Wall,-Werror -DTORCH_EXTENSION_NAME=megatron_llm_kernels \
        -I"$out/stub" -isystem "$torch_include" -isystem "$torch_include/torch/csrc/api/include" \
        -isystem "$py_include" -c "$here/bindings.cpp" -o "$out/bindings.o" \
        >"$out/bindings.cpp.log" 2>&1 &
    pids+=($!)
    names+=(bindings.cpp)
else
    echo "csrc: bindings.cpp not checked: $python cannot import torch"
fi

failed=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        echo "csrc: ${names[$i]} ok"
    else
        failed=1
        echo "csrc: ${names[$i]} FAILED:"
        cat "$out/${names[$i]}.log"
    fi
done
echo "csrc: compile check took $((SECONDS - start)) s"
exit "$failed"
