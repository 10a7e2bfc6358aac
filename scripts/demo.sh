#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the real model: `lordba demo` (about 11 minutes on 2 CPU
# cores; writes results/demo/). Extra arguments go to `lordba demo`, e.g. scripts/demo.sh --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
lordba demo "$@"
