#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check src lab tests benchmarks
lint-imports
python -m pytest -q "$@"
