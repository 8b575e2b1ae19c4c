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
# Usage: scripts/snapkv-pkg-config.sh [--plugin] [--prefix DIR | --print VAR] [PROFILE_DIR]
#   PROFILE_DIR: cargo's output directory for the profile (default
#   target/release, or target/plugin/release with --plugin). The file is
#   written to PROFILE_DIR/pkgconfig/snapkv.pc; its path is printed.
#   --prefix DIR: the file for an installed tree instead (scripts/install.sh
#   copies the files; default build only): written to
#   ${DESTDIR}DIR/lib/pkgconfig/snapkv.pc, pointing at DIR/lib/libsnapkv.a,
#   DIR/include/snapkv.h and llama.cpp's headers in DIR/include/snapkv/llama.cpp.
#   --print VAR: print one variable of the build-tree file (libdir,
#   includedir, llama_libdir, llama_includedir, system_libs, version) and
#   write nothing.
# Without --prefix the paths point into the build tree (nothing is
# installed): rerun after moving the tree or switching llama.cpp.
#
# This script is the one place that knows what libsnapkv.a must be linked
# with (`system_libs` below, also a variable of the .pc file): install.sh
# derives the CMake package's link interface from the file it writes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

plugin=0 prefix="" print=""
while (($#)); do
    case $1 in
    --plugin) plugin=1 ;;
    --prefix)
        [[ -n ${2:-} ]] || { echo "--prefix needs a directory" >&2; exit 2; }
        prefix="$2"
        shift
        ;;
    --print)
        case ${2:-} in
        libdir | includedir | llama_libdir | llama_includedir | system_libs | version) print="$2" ;;
        *) echo "--print: no variable ${2:-}" >&2; exit 2 ;;
        esac
        shift
        ;;
    -*) echo "unknown option $1 (usage: $0 [--plugin] [--prefix DIR | --print VAR] [PROFILE_DIR])" >&2; exit 2 ;;
    *) break ;;
    esac
    shift
done
if [[ -n $prefix && -n $print ]]; then
    echo "--prefix and --print exclude each other" >&2
    exit 2
fi
if ((plugin)) && [[ -n $prefix ]]; then
    echo "--prefix installs the default build only, not --plugin" >&2
    exit 2
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

# What `rustc --print native-static-libs` lists on Linux, plus libstdc++ for
# llama.cpp.
system_libs="-lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl"

version="$(sed -n 's/^version = "\([0-9.]*\).*/\1/p' "$root/Cargo.toml" | head -1)"
if [[ -n $print ]]; then
    libdir="$profile" includedir="$root/include" llama_libdir="$llama_lib" llama_includedir="$llama_inc"
    echo "${!print}"
    exit 0
fi
if [[ -n $prefix ]]; then
    [[ $prefix == /* ]] || prefix="$PWD/$prefix"
    pcdir="${DESTDIR:-}$prefix/lib/pkgconfig"
else
    pcdir="$profile/pkgconfig"
fi
mkdir -p "$pcdir"
pc="$pcdir/snapkv.pc"
{
    if [[ -n $prefix ]]; then
        echo "prefix=$prefix"
        echo "libdir=\${prefix}/lib"
        echo "includedir=\${prefix}/include"
        echo "llama_includedir=\${includedir}/snapkv/llama.cpp"
    else
        echo "libdir=$profile"
        echo "includedir=$root/include"
        echo "llama_libdir=$llama_lib"
        echo "llama_includedir=$llama_inc"
    fi
    ((plugin)) || echo "system_libs=$system_libs"
    echo
    echo "Name: snapkv"
    echo "Version: $version"
    echo "Cflags: -I\${includedir} -I\${llama_includedir}"
    if ((plugin)); then
        echo "Description: SnapKV KV-cache compression for llama.cpp (plugin: uses the shared libllama)"
        echo "Libs: -L\${libdir} -lsnapkv -L\${llama_libdir} -lllama -Wl,-rpath,\${libdir} -Wl,-rpath,\${llama_libdir}"
    else
        echo "Description: SnapKV KV-cache compression for llama.cpp (static, llama.cpp included)"
        echo "Libs: \${libdir}/libsnapkv.a \${system_libs}"
    fi
} >"$pc"
echo "$pc"
