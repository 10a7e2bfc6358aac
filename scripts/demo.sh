#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the real model; extra arguments go to `lordba demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python examples/quickstart.py
