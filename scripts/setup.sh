#!/usr/bin/env bash
# Create .venv (idempotent), install pinned dependencies, lordba and its lab (lab/), and fetch the default assets.
# Usage: scripts/setup.sh            (re-running is cheap: installs are skipped when nothing changed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.lordba-install-stamp
want=$(cat pyproject.toml lab/pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and exactly: a looser spec would pull a CUDA build (GBs) on CPU machines.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -c constraints.txt -e ".[all,dev]" -e lab
  echo "$want" > "$stamp"
fi
lordba fetch-assets --quantize-base
lordba build-kernels
