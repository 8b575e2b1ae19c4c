#!/usr/bin/env bash
# One-time setup on a fresh Debian machine: build prerequisites (apt, when
# missing), the pinned llama.cpp sources and the models. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v cc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
# libclang itself (bindgen loads it), not libclang-cpp, which LLVM packages
# bring along without it.
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null ||
    compgen -G '/usr/lib/*/libclang-[0-9]*.so*' >/dev/null || need+=(libclang-dev)
command -v valgrind >/dev/null || need+=(valgrind)
# The font the report plots (snapkv eval / bench) draw their text with.
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || need+=(fonts-dejavu-core)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

"$root/vendor/fetch-llama-cpp.sh"
"$root/scripts/fetch-models.sh" "${1:-all}"
