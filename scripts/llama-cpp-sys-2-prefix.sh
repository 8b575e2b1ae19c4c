#!/usr/bin/env bash
# Prints the install prefix of the llama.cpp that llama-cpp-sys-2 built for
# examples/llama-cpp-2 (headers, static libraries and ggml's CMake package,
# in that crate's build-script output), building the example first if it
# is not built yet (as tests/llama_cpp_2.rs does, into the same target
# directory, so a second build is a no-op). The second llama.cpp snapkv
# supports (ggml 0.26), as llama-cpp-2 programs run it, for
#
#   SNAPKV_LLAMA_PREFIX="$(scripts/llama-cpp-sys-2-prefix.sh)" cargo test --release --target-dir target/second-tree ...
#
#   scripts/llama-cpp-sys-2-prefix.sh [TARGET_DIR]     (default target/llama-cpp-2)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-$root/target/llama-cpp-2}"
cargo build --release --locked --manifest-path "$root/examples/llama-cpp-2/Cargo.toml" \
    --target-dir "$target" >&2
prefix=""
for out in $(ls -td "$target"/release/build/llama-cpp-sys-2-*/out 2>/dev/null); do
    if [[ -f $out/include/llama.h && -f $out/lib/libllama.a ]]; then
        prefix="$out"
        break
    fi
done
if [[ -z $prefix ]]; then
    echo "no llama-cpp-sys-2 build with lib/libllama.a under $target/release/build" >&2
    exit 1
fi
echo "$prefix"
