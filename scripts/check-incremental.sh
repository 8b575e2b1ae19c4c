#!/usr/bin/env bash
# Checks that touching only Rust code does not rerun build.rs (and so does not
# rebuild llama.cpp). Run after a release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --lib >/dev/null 2>&1
touch src/lib.rs
out="$(cargo build --release --lib -vv 2>&1)"
if grep -q "Running .*build-script-build" <<<"$out"; then
    echo "FAIL: touching src/lib.rs reran build.rs (llama.cpp would be rebuilt)" >&2
    exit 1
fi
grep -q "Compiling snapkv" <<<"$out" || { echo "FAIL: the crate was not recompiled at all" >&2; exit 1; }
echo "ok: touching src/lib.rs recompiles the crate without rerunning build.rs"
