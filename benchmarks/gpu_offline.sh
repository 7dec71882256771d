#!/usr/bin/env bash
# benchmarks/gpu.py on a GPU machine without network, with the packages of benchmarks/gpu_wheels.sh:
# installs them into /tmp (never into the machine's python), makes a `python` for the TRL 1.12 worker,
# then runs each part as its own process under its own time limit, so a part that hangs or fails
# leaves the others' figures. Each part writes OUT/gpu-PART.json (gpu.py saves after every part) and
# the whole log goes to OUT/gpu.log.
#
#   benchmarks/gpu_offline.sh OUT [SITE]        # SITE: default .devsite
#   PARTS="bnb:170 sft:130" GPU_ARGS=--dry-run PYTHON=.venv/bin/python benchmarks/gpu_offline.sh OUT   # rehearsal
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:?usage: gpu_offline.sh OUT [SITE]}
site=${2:-$repo/.devsite}
py=${PYTHON:-python3}
mkdir -p "$out"
exec > >(tee -a "$out/gpu.log") 2>&1
started=$SECONDS
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlhf-site "$site"/whl/*.whl || exit 1
cp -r "$site"/bnb/* /tmp/rlhf-site/
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlhf-site112 "$site"/whl112/*.whl || exit 1
export PYTHONPATH=/tmp/rlhf-site
cat > /tmp/rlhf-trl112-python <<SH
#!/bin/sh
PYTHONPATH=/tmp/rlhf-site112\${PYTHONPATH:+:\$PYTHONPATH} exec $py "\$@"
SH
chmod +x /tmp/rlhf-trl112-python
echo "installed in $((SECONDS - started)) s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
df -h /tmp "$repo" | tail -2; grep -E " / | /tmp " /proc/mounts
# Seconds per part: bnb first also builds and saves the 1.3B model (reused by the others).
for part_limit in ${PARTS:-bnb:150 sft:120 ppo:260 checkpoint:90 smoke:210}; do
  part=${part_limit%%:*} limit=${part_limit##*:}
  echo "== $part (limit $limit s) at $((SECONDS - started)) s"
  if [[ $part == fsdp ]]; then  # resources.sharding FSDP: SIGTERM, resume, next stages (benchmarks/gpu_fsdp.py)
    timeout --kill-after=10 "$limit" "$py" "$repo/benchmarks/gpu_fsdp.py" --out "$out" --assets "$site/tiny-assets"
  elif [[ $part == smoke ]]; then  # every method's tiny example on the GPU (benchmarks/gpu_smoke.py)
    timeout --kill-after=10 "$limit" "$py" "$repo/benchmarks/gpu_smoke.py" --out "$out" --assets "$site/tiny-assets" \
      ${SMOKE_ARGS:-}
  else
    timeout --kill-after=10 "$limit" "$py" "$repo/benchmarks/gpu.py" --only "$part" --workspace /tmp/rlhf-gpu-bench \
      --trl-python /tmp/rlhf-trl112-python --json "$out/gpu-$part.json" ${GPU_ARGS:-}
  fi
  echo "== $part exit $? at $((SECONDS - started)) s"
done
