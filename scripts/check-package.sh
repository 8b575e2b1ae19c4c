#!/usr/bin/env bash
# Checks the crate as a registry would serve it: `cargo package` makes it
# (the pinned llama.cpp sources inside, no models), it stays under the
# registry's 10 MiB limit, and a new project that depends on the unpacked
# crate by path builds with no network and answers a question with the
# default model through the library (examples/ask.rs as its main). With
# DOCS_RS set, the crate documents without building any native code.
#
# Run after `scripts/setup.sh` (which fetches vendor/llama.cpp and the
# models) and a normal build (which fills cargo's download cache). The
# builds go to target/package-check and target/package-docs, so a second run
# is incremental.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
cargo package -p snapkv --no-verify --allow-dirty >/dev/null
crate="$root/target/package/snapkv-$version.crate"
size=$(stat -c %s "$crate")
limit=$((10 * 1024 * 1024))
if ((size > limit)); then
    echo "FAIL: $crate is $size bytes, over the registry's $limit" >&2
    exit 1
fi
if tar -tzf "$crate" | grep -qE '\.gguf$|^[^/]+/models/'; then
    echo "FAIL: the packaged crate carries models" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -xzf "$crate" -C "$work"
unpacked="$work/snapkv-$version"
mkdir -p "$work/app/src"
cp examples/ask.rs "$work/app/src/main.rs"
cat >"$work/app/Cargo.toml" <<TOML
[package]
name = "snapkv-package-check"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
snapkv = { path = "$unpacked" }

[workspace]
TOML

# The dependency must build from the crate's own contents: no network, and
# no LLAMA_CPP_DIR or SNAPKV_LLAMA_PREFIX pointing at another llama.cpp. It
# builds as a dependent's does: SNAPKV_CMAKE_ARGS set empty over this
# repository's .cargo/config.toml (which cargo reads from the working
# directory), so llama.cpp is compiled for the x86-64 baseline, the level
# the Rust target gives it, with no AVX2.
env -u LLAMA_CPP_DIR -u SNAPKV_LLAMA_PREFIX SNAPKV_CMAKE_ARGS="" CARGO_TARGET_DIR="$root/target/package-check" \
    cargo build --release --offline --manifest-path "$work/app/Cargo.toml"
app="$root/target/package-check/release/snapkv-package-check"

# ~480 tokens compressed to 128 cells, a short prompt: the baseline
# build's kernels (no AVX2) evaluate this model several times slower than
# the repository's build (85 s for this one here).
doc="$work/document.txt"
{
    for i in $(seq 1 24); do
        echo "Line $i of the inventory notes: the shelves were counted twice and the totals agreed."
        [[ $i == 11 ]] && echo "The code word for the north warehouse is MARIGOLD."
    done
} >"$doc"
answer="$("$app" "$doc" "What is the code word for the north warehouse? Answer with the word only." \
    --model "$root/models/qwen2.5-coder-0.5b-instruct.gguf" --budget 128 --threads 2)"
echo "answer from the packaged crate: $answer"
if ! grep -qi marigold <<<"$answer"; then
    echo "FAIL: the program built from the packaged crate did not answer MARIGOLD" >&2
    exit 1
fi

env -u LLAMA_CPP_DIR -u SNAPKV_LLAMA_PREFIX DOCS_RS=1 CARGO_TARGET_DIR="$root/target/package-docs" \
    cargo doc --offline --no-deps --manifest-path "$unpacked/Cargo.toml" >/dev/null
if [[ ! -f "$root/target/package-docs/doc/snapkv/index.html" ]]; then
    echo "FAIL: no documentation was written with DOCS_RS set" >&2
    exit 1
fi
if find "$root/target/package-docs" -name 'libllama.a' | grep -q .; then
    echo "FAIL: DOCS_RS built llama.cpp" >&2
    exit 1
fi
echo "ok: $(basename "$crate") ($((size / 1024)) KiB) builds offline, answers, and documents without native code"
