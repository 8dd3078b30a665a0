#!/usr/bin/env bash
# Tune the one knob on the validation questions, then name the best value.
#
#   bash sweep.sh                                   # SLIM kappa grid on smollm2_135M
#   MODEL=llama_7B KAPPAS="10 20 30 40" bash sweep.sh --device 0
#   METHOD=iti ALPHAS="0 2 5 10 15" bash sweep.sh   # ITI's alpha, same questions
#   METHOD=linear_act STRENGTHS="0 0.25 0.5 1" bash sweep.sh      # Linear-AcT's lambda
#   METHOD=slim_on_iti_heads KAPPAS="10 40" bash sweep.sh          # Table 2's mixed arms (mixed_arms.py)
#   METHOD=iti_on_slim_layer ALPHAS="2 5 15" bash sweep.sh
#
# Environment: MODEL, METHOD (slim|iti|linear_act|slim_on_iti_heads|iti_on_slim_layer), KAPPAS, ALPHAS, STRENGTHS, CRITERION (true_info|true|info|sem),
# MAX_DEGENERACY (a setting above it is never chosen), NUM_FOLD, BL, GAMMA, NUM_HEADS, MAX_QUESTIONS.
# Extra arguments go to every run. The choice is written to validation/<model>_best_<method>.json,
# which `ot_edit_layer.py --kappa best` and `validate_2fold.py --alpha best` read.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/env.sh && slim_use_env  # the active environment, else .venv from install.sh (scripts/env.sh)
MODEL=${MODEL:-smollm2_135M}
METHOD=${METHOD:-slim}
KAPPAS=${KAPPAS:-"0 10 20 40 80"}
ALPHAS=${ALPHAS:-"0 1 2 5 10 15"}
STRENGTHS=${STRENGTHS:-"0 0.25 0.5 0.75 1"}
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
elif [ "$METHOD" = linear_act ]; then
  param=strength
  for l in $STRENGTHS; do
    python linear_act.py "$MODEL" --num_fold "$NUM_FOLD" --strength "$l" \
      --use_mode val --out_dir "$OUT_DIR" --summary_out "$written" "${quick[@]}" "$@"
    summaries+=("$(head -n 1 "$written")")
  done
elif [ "$METHOD" = slim_on_iti_heads ] || [ "$METHOD" = iti_on_slim_layer ]; then
  if [ "$METHOD" = slim_on_iti_heads ]; then param=kappa; values=$KAPPAS; else param=alpha; values=$ALPHAS; fi
  for v in $values; do
    python mixed_arms.py "$MODEL" --arm "$METHOD" --num_fold "$NUM_FOLD" --bl "$BL" --gamma "$GAMMA" \
      --num_heads "$NUM_HEADS" --use_center_of_mass "--$param" "$v" \
      --use_mode val --out_dir "$OUT_DIR" --summary_out "$written" "${quick[@]}" "$@"
    summaries+=("$(head -n 1 "$written")")
  done
else
  echo "error: METHOD must be slim, iti, linear_act, slim_on_iti_heads or iti_on_slim_layer, got '$METHOD'." >&2
  exit 2
fi
python -m slim.evaluation.sweep --criterion "$CRITERION" --max_degeneracy "$MAX_DEGENERACY" --param "$param" \
  --method "$METHOD" --out_dir "$OUT_DIR" "${summaries[@]}"
