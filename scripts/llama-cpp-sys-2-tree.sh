#!/usr/bin/env bash
# Prints the path of the llama.cpp tree inside the llama-cpp-sys-2 crate
# that examples/llama-cpp-2 pins (version in its Cargo.toml, checksum in its
# Cargo.lock), after fetching the crate with cargo if it is not there yet.
# The second llama.cpp snapkv supports (ggml 0.26):
#
#   LLAMA_CPP_DIR="$(scripts/llama-cpp-sys-2-tree.sh)" cargo test --release --target-dir target/second-tree ...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
manifest="$root/examples/llama-cpp-2/Cargo.toml"
cargo fetch --locked --manifest-path "$manifest" >/dev/null
crate_manifest="$(cargo metadata --locked --format-version 1 --manifest-path "$manifest" |
    grep -o '"manifest_path":"[^"]*/llama-cpp-sys-2-[0-9][^"/]*/Cargo.toml"' | head -n 1 |
    sed -e 's/^"manifest_path":"//' -e 's/"$//')"
if [[ -z "$crate_manifest" ]]; then
    echo "llama-cpp-sys-2 is not in the dependencies of $manifest" >&2
    exit 1
fi
tree="$(dirname "$crate_manifest")/llama.cpp"
if [[ ! -f "$tree/include/llama.h" ]]; then
    echo "$tree is not a llama.cpp tree (no include/llama.h)" >&2
    exit 1
fi
echo "$tree"
