#!/usr/bin/env bash
# Materialise vendor/llama.cpp from the pinned llama-cpp-python source
# distribution (see vendor/pin.env). Idempotent: does nothing when the tree
# for the current pin is already there. build.rs never downloads; this does.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=vendor/pin.env
source "$here/pin.env"

dest="$here/llama.cpp"
stamp="$dest/.snapkv-pin"
want="llama-cpp-python==$LLAMA_CPP_PY_VERSION sha256=$LLAMA_CPP_PY_SDIST_SHA256"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "vendor/llama.cpp is already at $want"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading the source distribution of llama-cpp-python==$LLAMA_CPP_PY_VERSION"
python3 -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$work"
archive="$(ls "$work"/llama_cpp_python-"$LLAMA_CPP_PY_VERSION".tar.gz)"
got="$(sha256sum "$archive" | cut -d' ' -f1)"
if [[ "$got" != "$LLAMA_CPP_PY_SDIST_SHA256" ]]; then
    echo "error: checksum mismatch for $(basename "$archive")" >&2
    echo "  expected $LLAMA_CPP_PY_SDIST_SHA256" >&2
    echo "  got      $got" >&2
    exit 1
fi
prefix="llama_cpp_python-$LLAMA_CPP_PY_VERSION/vendor/llama.cpp"
tar -xzf "$archive" -C "$work" "$prefix"
rm -rf "$dest"
mv "$work/$prefix" "$dest"
echo "$want" > "$stamp"
echo "vendor/llama.cpp ready ($want)"
