#!/usr/bin/env bash
# Installs the default build of snapkv for C and C++ programs: the library,
# its header, llama.cpp's headers, a pkg-config file and a CMake package, so
# that a CMake project links it with
#
#   find_package(snapkv 0.1 REQUIRED)
#   target_link_libraries(app PRIVATE snapkv::snapkv)
#
# and any other build with `pkg-config --cflags --libs snapkv`.
#
# Usage: scripts/install.sh [--prefix DIR] [PROFILE_DIR]
#   --prefix DIR  where to install (default /usr/local). DESTDIR, if set, is
#                 prepended to every file written (staging for packages);
#                 the files still name DIR.
#   PROFILE_DIR   cargo's output directory for the profile (default
#                 ${CARGO_TARGET_DIR:-target}/release).
#
# It builds nothing: run `cargo build --release -p snapkv` first, as your
# own user (then `sudo scripts/install.sh` for /usr/local, so that cargo
# never runs as root and the build tree stays yours).
#
# Layout under the prefix:
#   lib/libsnapkv.a             the library, llama.cpp included (static)
#   lib/libsnapkv.so            the cdylib of the same build; it exports only
#                               snapkv_* (its llama.cpp is private), so a
#                               program that calls llama.h links the .a
#   include/snapkv.h
#   include/snapkv/llama.cpp/   llama.h, llama-cpp.h, ggml*.h, gguf.h of the
#                               llama.cpp inside libsnapkv.a (snapkv.h includes
#                               llama.h); apart, so that they never overwrite
#                               the headers of a llama.cpp installed separately
#   lib/pkgconfig/snapkv.pc     written by scripts/snapkv-pkg-config.sh --prefix
#   lib/cmake/snapkv/snapkvConfig.cmake, snapkvConfigVersion.cmake
#                               the IMPORTED target snapkv::snapkv (the .a)
# The link line (system libraries) and the version come from
# scripts/snapkv-pkg-config.sh, through the .pc file it writes. The CMake
# package locates itself: the installed tree can be moved as a whole.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
pkgconf="$here/snapkv-pkg-config.sh"

prefix=/usr/local
while (($#)); do
    case $1 in
    --prefix)
        [[ -n ${2:-} ]] || { echo "--prefix needs a directory" >&2; exit 2; }
        prefix="$2"
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    -*) echo "unknown option $1 (usage: $0 [--prefix DIR] [PROFILE_DIR])" >&2; exit 2 ;;
    *) break ;;
    esac
    shift
done
(($# <= 1)) || { echo "usage: $0 [--prefix DIR] [PROFILE_DIR]" >&2; exit 2; }
profile="${1:-${CARGO_TARGET_DIR:-$root/target}/release}"
[[ $prefix == /* ]] || prefix="$PWD/$prefix"
for lib in libsnapkv.a libsnapkv.so; do
    [[ -f $profile/$lib ]] || {
        echo "no $profile/$lib: run \`cargo build --release -p snapkv\` first" >&2
        exit 1
    }
done
command -v cmake >/dev/null || { echo "cmake is needed (it also builds llama.cpp)" >&2; exit 1; }

# The llama.cpp headers that go with libsnapkv.a: the include directory of
# the llama.cpp build that build.rs made (found by the pkg-config script).
llama_inc="$(bash "$pkgconf" --print llama_includedir "$profile")"

dest="${DESTDIR:-}$prefix"
install -d "$dest/lib" "$dest/include" "$dest/lib/cmake/snapkv"
install -m 644 "$profile/libsnapkv.a" "$dest/lib/libsnapkv.a"
install -m 755 "$profile/libsnapkv.so" "$dest/lib/libsnapkv.so"
install -m 644 "$root/include/snapkv.h" "$dest/include/snapkv.h"
rm -rf "$dest/include/snapkv/llama.cpp"
install -d "$dest/include/snapkv/llama.cpp"
install -m 644 "$llama_inc"/*.h "$dest/include/snapkv/llama.cpp/"

pc="$(bash "$pkgconf" --prefix "$prefix" "$profile")"
version="$(sed -n 's/^Version: //p' "$pc")"
system_libs="$(sed -n 's/^system_libs=//p' "$pc")"
[[ -n $version && -n $system_libs ]] || { echo "$pc lacks Version or system_libs" >&2; exit 1; }

# The pkg-config link line as CMake's link interface: -lpthread becomes
# Threads::Threads (find_dependency(Threads) below), -lNAME becomes NAME.
link=()
for flag in $system_libs; do
    case $flag in
    -lpthread) link+=(Threads::Threads) ;;
    -l*) link+=("${flag#-l}") ;;
    *) echo "$pc: cannot express $flag in CMake" >&2; exit 1 ;;
    esac
done
link_list="$(IFS=';'; echo "${link[*]}")"

cat >"$dest/lib/cmake/snapkv/snapkvConfig.cmake" <<CMAKE
# snapkvConfig.cmake: snapkv $version, written by snapkv's scripts/install.sh.
#
#   find_package(snapkv 0.1 REQUIRED)
#   target_link_libraries(app PRIVATE snapkv::snapkv)
#
# snapkv::snapkv is lib/libsnapkv.a, which contains llama.cpp: the target
# brings the include directories of snapkv.h and of that llama.cpp's headers
# (llama.h, ggml*.h) and the system libraries the archive needs (the link
# line of lib/pkgconfig/snapkv.pc). Link no other libllama or libggml beside
# it. Paths are found from this file's location.

include(CMakeFindDependencyMacro)
find_dependency(Threads)

get_filename_component(_snapkv_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT EXISTS "\${_snapkv_prefix}/lib/libsnapkv.a" OR NOT EXISTS "\${_snapkv_prefix}/include/snapkv.h")
  set(snapkv_FOUND FALSE)
  set(snapkv_NOT_FOUND_MESSAGE
      "\${_snapkv_prefix} lacks lib/libsnapkv.a or include/snapkv.h: rerun snapkv's scripts/install.sh")
  unset(_snapkv_prefix)
  return()
endif()

if(NOT TARGET snapkv::snapkv)
  add_library(snapkv::snapkv STATIC IMPORTED)
  set_target_properties(snapkv::snapkv PROPERTIES
    IMPORTED_LOCATION "\${_snapkv_prefix}/lib/libsnapkv.a"
    INTERFACE_INCLUDE_DIRECTORIES "\${_snapkv_prefix}/include;\${_snapkv_prefix}/include/snapkv/llama.cpp"
    INTERFACE_LINK_LIBRARIES "$link_list")
endif()
unset(_snapkv_prefix)
CMAKE

# The version file from CMake's own helper: 0.1.x satisfies a request for
# 0.1 (before 1.0 a minor version may break the API), from a project with
# this machine's pointer size.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/version.cmake" <<'CMAKE'
include(CMakePackageConfigHelpers)
write_basic_package_version_file("${OUT}" VERSION "${VERSION}" COMPATIBILITY SameMinorVersion)
CMAKE
cmake -DOUT="$dest/lib/cmake/snapkv/snapkvConfigVersion.cmake" -DVERSION="$version" \
    -DCMAKE_SIZEOF_VOID_P=$(($(getconf LONG_BIT) / 8)) -P "$tmp/version.cmake"

echo "installed snapkv $version into $prefix${DESTDIR:+ (staged under $DESTDIR)}:"
for f in lib/libsnapkv.a lib/libsnapkv.so include/snapkv.h include/snapkv/llama.cpp/ lib/pkgconfig/snapkv.pc \
    lib/cmake/snapkv/snapkvConfig.cmake lib/cmake/snapkv/snapkvConfigVersion.cmake; do
    echo "  $prefix/$f"
done
