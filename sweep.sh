#!/usr/bin/env bash
# Tune the one knob on the validation questions, then name the best value.
#
#   bash sweep.sh                                   # SLIM kappa grid on smollm2_135M
#   MODEL=llama_7B KAPPAS="10 20 30 40" bash sweep.sh --device 0
#   METHOD=iti ALPHAS="0 2 5 10 15" bash sweep.sh   # ITI's alpha, same questions
#
# Environment: MODEL, METHOD (slim|iti), KAPPAS, ALPHAS, CRITERION (true_info|true|info|sem),
# MAX_DEGENERACY (a setting above it is never chosen), NUM_FOLD, BL, GAMMA, NUM_HEADS, MAX_QUESTIONS.
# Extra arguments go to every run. The choice is written to validation/<model>_best_<method>.json,
# which `ot_edit_layer.py --kappa best` and `validate_2fold.py --alpha best` read.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-smollm2_135M}
METHOD=${METHOD:-slim}
KAPPAS=${KAPPAS:-"0 10 20 40 80"}
ALPHAS=${ALPHAS:-"0 1 2 5 10 15"}
CRITERION=${CRITERION:-true_info}
MAX_DEGENERACY=${MAX_DEGENERACY:-0.2}
NUM_FOLD=${NUM_FOLD:-2}
BL=${BL:-1.0}
GAMMA=${GAMMA:-0.1}
NUM_HEADS=${NUM_HEADS:-48}
OUT_DIR=${OUT_DIR:-validation}
quick=()
[ -n "${MAX_QUESTIONS:-}" ] && quick=(--max_questions "$MAX_QUESTIONS")

summaries=()
written=$(mktemp)  # each run writes the path of its summary here (--summary_out)
trap 'rm -f "$written"' EXIT
if [ "$METHOD" = slim ]; then
  param=kappa
  for k in $KAPPAS; do
    python ot_edit_layer.py "$MODEL" --num_fold "$NUM_FOLD" --bl "$BL" --alpha "$GAMMA" --kappa "$k" \
      --use_mode val --out_dir "$OUT_DIR" --summary_out "$written" "${quick[@]}" "$@"
    summaries+=("$(head -n 1 "$written")")
  done
elif [ "$METHOD" = iti ]; then
  param=alpha
  for a in $ALPHAS; do
    python validate_2fold.py "$MODEL" --num_fold "$NUM_FOLD" --num_heads "$NUM_HEADS" --alpha "$a" \
      --use_center_of_mass --use_mode val --out_dir "$OUT_DIR" --summary_out "$written" "${quick[@]}" "$@"
    summaries+=("$(head -n 1 "$written")")
  done
else
  echo "error: METHOD must be slim or iti, got '$METHOD'." >&2
  exit 2
fi
python -m slim.sweep --criterion "$CRITERION" --max_degeneracy "$MAX_DEGENERACY" --param "$param" \
  --method "$METHOD" --out_dir "$OUT_DIR" "${summaries[@]}"
