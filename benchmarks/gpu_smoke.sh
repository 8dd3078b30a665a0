#!/usr/bin/env bash
# One prepared GPU check (#22), at most 10 minutes: every GPU path once, then one table
# (step, pass/fail, peak GPU memory, time). See benchmarks/gpu_smoke.py for the steps.
#
#   python benchmarks/gpu_smoke.py --prepare .smoke     # here, once (.smoke/ is git-ignored: carry it)
#   bash benchmarks/gpu_smoke.sh                        # on the GPU machine
#   SMOKE_MODEL=meta-llama/Llama-2-7b-chat-hf bash benchmarks/gpu_smoke.sh   # a hub model, when reachable
#
# The environment as every driver picks it (scripts/env.sh): the active one, else .venv, else the python on
# PATH, as on a lent GPU machine that has torch and transformers but not this project installed (the
# repository root goes on PYTHONPATH). The table is also written to $OUT/gpu_smoke.md when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh && slim_use_env || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
table=()
[ -n "${OUT:-}" ] && table=(--table "$OUT/gpu_smoke.md")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${SMOKE_TIMEOUT:-570}" python3 benchmarks/gpu_smoke.py "${table[@]}" "$@"
rc=$?
[ $rc = 124 ] && echo "error: the smoke run passed its ${SMOKE_TIMEOUT:-570} s limit; the rows above are what finished." >&2
exit $rc
