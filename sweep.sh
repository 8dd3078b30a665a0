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
# MAX_DEGENERACY (a setting above it is never chosen), NUM_FOLD, BL, GAMMA, NUM_HEADS (ITI's K; default per model,
# slim.models.defaults), MAX_QUESTIONS.
# One Python process scores the whole grid (the model and the judges loaded once); extra arguments go to it.
# ENGINE=ray: one Ray task per value of the grid instead (scripts/engine.sh), then the same choice.
# The choice is written to validation/<model>_best_<method>.json, which `ot_edit_layer.py --kappa best` and
# `validate_2fold.py --alpha best` read.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/env.sh && slim_use_env  # the active environment, else .venv from install.sh (scripts/env.sh)
. scripts/engine.sh  # ENGINE=sequential (default) or ray: unit, wait_units
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
OUT_DIR=${OUT_DIR:-validation}
quick=()
[ -n "${MAX_QUESTIONS:-}" ] && quick=(--max_questions "$MAX_QUESTIONS")

written=$(mktemp)  # the run writes the paths of its summaries here, one per grid value (--summary_out)
outs=$(mktemp -d)  # under ENGINE=ray: each task's own list
trap 'rm -rf "$written" "$outs"' EXIT
# ITI's K, where the method has one and NUM_HEADS does not say: chosen per model (slim.models.defaults)
num_heads() { python -m slim.models.defaults num_heads "$MODEL" "$@"; }
# one process per method for the whole grid: the model, the probes and the judges are loaded once
if [ "$METHOD" = slim ]; then
  param=kappa; read -r -a grid <<< "$KAPPAS"
  run=(ot_edit_layer.py "$MODEL" --bl "$BL" --alpha "$GAMMA" --kappa)
elif [ "$METHOD" = iti ]; then
  param=alpha; read -r -a grid <<< "$ALPHAS"
  NUM_HEADS=${NUM_HEADS:-$(num_heads "$@")}
  run=(validate_2fold.py "$MODEL" --num_heads "$NUM_HEADS" --use_center_of_mass --alpha)
elif [ "$METHOD" = linear_act ]; then
  param=strength; read -r -a grid <<< "$STRENGTHS"
  run=(linear_act.py "$MODEL" --strength)
elif [ "$METHOD" = slim_on_iti_heads ] || [ "$METHOD" = iti_on_slim_layer ]; then
  param=alpha; values=$ALPHAS
  [ "$METHOD" = slim_on_iti_heads ] && param=kappa && values=$KAPPAS
  read -r -a grid <<< "$values"
  NUM_HEADS=${NUM_HEADS:-$(num_heads "$@")}
  run=(mixed_arms.py "$MODEL" --arm "$METHOD" --bl "$BL" --gamma "$GAMMA" --num_heads "$NUM_HEADS"
    --use_center_of_mass "--$param")
else
  echo "error: METHOD must be slim, iti, linear_act, slim_on_iti_heads or iti_on_slim_layer, got '$METHOD'." >&2
  exit 2
fi
if [ ${#grid[@]} -eq 0 ]; then
  echo "error: the $param grid is empty: set ${param^^}S (e.g. ${param^^}S=\"0 10 40\")." >&2
  exit 2
fi
if [ "${ENGINE:-sequential}" = ray ]; then  # one task per value of the grid, each writing its own summary list
  for i in "${!grid[@]}"; do
    unit "$MODEL sweep $METHOD $param=${grid[$i]}" -- python "${run[@]}" "${grid[$i]}" --num_fold "$NUM_FOLD" \
      --use_mode val --out_dir "$OUT_DIR" --summary_out "$outs/$i" "${quick[@]}" "$@"
  done
  wait_units
  for i in "${!grid[@]}"; do cat "$outs/$i"; done > "$written"
else
  python "${run[@]}" "${grid[@]}" --num_fold "$NUM_FOLD" --use_mode val --out_dir "$OUT_DIR" --summary_out "$written" \
    "${quick[@]}" "$@"
fi
mapfile -t summaries < "$written"
python -m slim.evaluation.sweep --criterion "$CRITERION" --max_degeneracy "$MAX_DEGENERACY" --param "$param" \
  --method "$METHOD" --out_dir "$OUT_DIR" "${summaries[@]}"
