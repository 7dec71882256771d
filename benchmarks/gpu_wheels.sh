#!/usr/bin/env bash
# Packages for benchmarks/gpu.py on a GPU machine that cannot reach the network (benchmarks/gpu_offline.sh
# installs them there). The machine brings python and torch with CUDA; this brings the project's own
# versions of the rest, for CPython 3.12 on x86-64 (change PYVER for another python):
#   DEST/whl      the project's pins (pydantic, transformers, peft, trl, datasets, ...), as wheels
#   DEST/whl112   trl 1.12.0 alone: the PPO baseline, put before the rest only in the TRL worker
#   DEST/bnb      bitsandbytes unpacked with only its CPU and CUDA $BNB_CUDA libraries: the whole wheel
#                 (43 MB, every CUDA and ROCm build) would not fit a 64 MiB transfer with the rest
#
#   benchmarks/gpu_wheels.sh [DEST]     # default .devsite (git ignores it through .git/info/exclude)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=$(realpath -m "${1:-$repo/.devsite}")  # absolute: the unzip below runs in another folder
PYVER=${PYVER:-3.12}
BNB_CUDA=${BNB_CUDA:-130}  # torch.version.cuda of the machine's torch, without the dot
py="$repo/.venv/bin/python"
# The versions of the project venv, so the GPU machine runs what the tests ran.
pins=$("$py" - <<'PY'
import importlib.metadata as m
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "trl",
         "datasets", "dill", "multiprocess", "transformers", "peft", "bitsandbytes"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
)
platforms=()
for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${p}_x86_64")
done
download=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf "$DEST/whl" "$DEST/whl112" "$DEST/bnb"
mkdir -p "$DEST/whl" "$DEST/whl112" "$DEST/bnb"
# shellcheck disable=SC2086  # pins is a list of words
"${download[@]}" -d "$DEST/whl" $pins
"${download[@]}" -d "$DEST/whl112" trl==1.12.0
(cd "$DEST/bnb" && unzip -q "$DEST"/whl/bitsandbytes-*.whl \
  && find . -name 'libbitsandbytes_*.so' ! -name "*cuda$BNB_CUDA.so" ! -name '*cpu.so' -delete)
rm "$DEST"/whl/bitsandbytes-*.whl
du -sh "$DEST"/*
