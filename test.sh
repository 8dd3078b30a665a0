#!/usr/bin/env bash
# The tests, in the environment the project's scripts use: the active one, else .venv from install.sh (scripts/env.sh).
#   bash test.sh                          all of them (python -m pytest -q)
#   bash test.sh tests/policies -x        arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
. scripts/env.sh && slim_use_env
python -c "import pytest" 2>/dev/null || { echo "test.sh: no pytest in the project's environment: run bash install.sh --dev" >&2; exit 1; }
exec python -m pytest -q "$@"
