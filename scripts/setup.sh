# Sourced by main.sh and test.sh: make .venv and install the project into it, once per change of
# setup.cfg. Safe to run again; does nothing when everything is in place.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.zoo-installed
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # Torch first, pinned: on these machines torch 2.13.0 is a CPU build on local disk (seconds),
  # where an unpinned torch would pull a multi-GB CUDA build. Set ZOO_TORCH to change the pin.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "${ZOO_TORCH:-torch==2.13.0}"
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
# Two threads match the 2-core machines this is tested on; override for bigger ones.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
