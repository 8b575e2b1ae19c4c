#!/usr/bin/env bash
# Writes a pkg-config file for the libsnapkv that cargo built, so that a C or
# C++ program links it in two lines:
#
#   cargo build --release && scripts/snapkv-pkg-config.sh
#   export PKG_CONFIG_PATH=$PWD/target/release/pkgconfig
#   cc app.c $(pkg-config --cflags --libs snapkv)
#
# Default build: libsnapkv.a, which contains llama.cpp (static), plus the
# system libraries Rust and llama.cpp need. With --plugin, for a build with
# `--features dynamic-link` (CARGO_TARGET_DIR=target/plugin by convention):
# libsnapkv.so and the shared libllama it was built against.
#
# Usage: scripts/snapkv-pkg-config.sh [--plugin] [PROFILE_DIR]
#   PROFILE_DIR: cargo's output directory for the profile (default
#   target/release, or target/plugin/release with --plugin). The file is
#   written to PROFILE_DIR/pkgconfig/snapkv.pc; its path is printed.
# The paths point into the build tree (nothing is installed): rerun after
# moving the tree or switching llama.cpp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

plugin=0
if [[ ${1:-} == --plugin ]]; then
    plugin=1
    shift
fi
if ((plugin)); then
    profile="${1:-$root/target/plugin/release}"
    want=libllama.so
    lib=libsnapkv.so
else
    profile="${1:-${CARGO_TARGET_DIR:-$root/target}/release}"
    want=libllama.a
    lib=libsnapkv.a
fi
profile="$(cd "$profile" && pwd)"
[[ -f $profile/$lib ]] || {
    echo "no $profile/$lib: build it first (cargo build --release${plugin:+ ...})" >&2
    exit 1
}

# build.rs publishes the llama.cpp it built as cargo metadata (lib_dir,
# include_dir) in the build script's output; take the newest that matches.
llama_lib="" llama_inc=""
for out in $(ls -t "$profile"/build/snapkv-*/output 2>/dev/null); do
    l="$(sed -n 's/^cargo:lib_dir=//p' "$out")"
    i="$(sed -n 's/^cargo:include_dir=//p' "$out")"
    if [[ -n $l && -f $l/$want && -f $i/llama.h ]]; then
        llama_lib="$l" llama_inc="$i"
        break
    fi
done
[[ -n $llama_lib ]] || {
    echo "no llama.cpp build with $want under $profile/build: build snapkv first" >&2
    exit 1
}

version="$(sed -n 's/^version = "\([0-9.]*\).*/\1/p' "$root/Cargo.toml" | head -1)"
mkdir -p "$profile/pkgconfig"
pc="$profile/pkgconfig/snapkv.pc"
{
    echo "libdir=$profile"
    echo "includedir=$root/include"
    echo "llama_libdir=$llama_lib"
    echo "llama_includedir=$llama_inc"
    echo
    echo "Name: snapkv"
    echo "Version: $version"
    echo "Cflags: -I\${includedir} -I\${llama_includedir}"
    if ((plugin)); then
        echo "Description: SnapKV KV-cache compression for llama.cpp (plugin: uses the shared libllama)"
        echo "Libs: -L\${libdir} -lsnapkv -L\${llama_libdir} -lllama -Wl,-rpath,\${libdir} -Wl,-rpath,\${llama_libdir}"
    else
        echo "Description: SnapKV KV-cache compression for llama.cpp (static, llama.cpp included)"
        # What `rustc --print native-static-libs` lists on Linux, plus libstdc++ for llama.cpp.
        echo "Libs: \${libdir}/libsnapkv.a -lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl"
    fi
} >"$pc"
echo "$pc"
