#!/usr/bin/env bash
# Builds the pinned llama.cpp tree's own programs -- llama-server,
# llama-completion, llama-cli and ggml-rpc-server -- with llama.cpp's CMake, as its users
# build them: shared libraries (libllama.so, libggml*.so), so that a library
# named in LD_PRELOAD interposes their llama.cpp calls.
#
#   scripts/build-llama-tools.sh [BUILD_DIR]     (default target/llama-tools)
#
# The programs land in BUILD_DIR/bin. Their shared libllama and libggml*,
# with the headers, are installed under BUILD_DIR/install, as `cmake
# --install` lays out a llama.cpp for the programs linked to it: the prefix
# a plugin build of snapkv links (SNAPKV_LLAMA_PREFIX, feature
# `dynamic-link`). A second run rebuilds only what changed. The instruction set is the explicit one build.rs uses, never
# -march=native (see README: some VMs advertise instructions they refuse).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="${LLAMA_CPP_DIR:-$root/vendor/llama.cpp}"
build="${1:-$root/target/llama-tools}"
[ -f "$src/tools/server/server.cpp" ] || {
    echo "build-llama-tools: no llama.cpp tree with tools/ at $src (run vendor/fetch-llama-cpp.sh)" >&2
    exit 1
}
isa=(-DGGML_NATIVE=OFF)
if [ "$(uname -m)" = x86_64 ]; then
    isa+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
fi
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_OPENMP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_ALL_WARNINGS=OFF "${isa[@]}" >/dev/null
cmake --build "$build" --config Release -j "${SNAPKV_CMAKE_JOBS:-$(nproc)}" \
    --target llama-server llama-completion llama-cli ggml-rpc-server
# ggml's install rules, then the top directory's alone (libllama, llama.h,
# libllama-common): the tools' rules would ask for programs not built here.
cmake --install "$build/ggml" --prefix "$build/install" >/dev/null
cmake -DCMAKE_INSTALL_PREFIX="$build/install" -DCMAKE_INSTALL_LOCAL_ONLY=ON \
    -P "$build/cmake_install.cmake" >/dev/null
echo "$build/bin"
