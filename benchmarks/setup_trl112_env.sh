#!/usr/bin/env bash
# A throwaway venv with TRL 1.12.0, the last TRL whose PPOTrainer exists (as trl.experimental.ppo),
# for benchmarks/ppo_vs_trl.py. TRL 1.12 is not a project dependency: this venv only adds it on top
# of the project venv's packages (torch, transformers, peft, accelerate are shared through a .pth
# file, so both sides of the benchmark run the very same libraries except TRL).
#
#   benchmarks/setup_trl112_env.sh [DEST]      # default /root/.cache/rlhf-operator/venv-trl112
#   BASE_VENV=/path/to/venv benchmarks/setup_trl112_env.sh   # default: the repo's .venv (resolved)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The real path: .venv is usually a symlink, and the .pth file must name the real site-packages.
BASE_VENV=$(readlink -f "${BASE_VENV:-$repo/.venv}")
DEST=${1:-/root/.cache/rlhf-operator/venv-trl112}

if [[ ! -x "$BASE_VENV/bin/python" ]]; then
  echo "no python in BASE_VENV=$BASE_VENV (make the project venv first, or set BASE_VENV)" >&2
  exit 1
fi
base_site=$("$BASE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Up to date only when it has trl 1.12.0 AND shares this base venv's packages.
if [[ -x "$DEST/bin/python" ]] \
  && "$DEST/bin/python" -c 'import trl, sys; sys.exit(trl.__version__ != "1.12.0")' 2>/dev/null \
  && grep -qxF "$base_site" "$DEST"/lib/python*/site-packages/rlhf-operator-base.pth 2>/dev/null; then
  echo "$DEST already has trl 1.12.0 on $BASE_VENV's packages"
  exit 0
fi
"$BASE_VENV/bin/python" -m venv --clear "$DEST"
dest_site=$("$DEST/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# .pth entries are appended to sys.path after the venv's own site-packages: trl 1.12 installed
# here shadows the project's trl, everything else comes from the project venv.
echo "$base_site" > "$dest_site/rlhf-operator-base.pth"
"$DEST/bin/python" -m pip install --quiet --no-deps "trl==1.12.0"
TRL_EXPERIMENTAL_SILENCE=1 "$DEST/bin/python" -c 'import trl, torch, transformers; from trl.experimental.ppo import PPOConfig, PPOTrainer; print("trl", trl.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
