#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite; extra arguments go to pytest.
# The tests run in one worker per core, at most 4, one thread each (pytest-xdist; tests/conftest.py);
# LORDBA_TEST_WORKERS=N sets the number, 0 runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check src lab tests benchmarks
lint-imports
cores=$(nproc 2>/dev/null || echo 1)
workers=${LORDBA_TEST_WORKERS:-$((cores < 4 ? cores : 4))}
if [ "$workers" -le 1 ]; then workers=0; fi
python -m pytest -q -n "$workers" --dist load --maxschedchunk 4 "$@"
